"""How many kernels one decode step of the generation engine launches, counted on the CPU.

A decode step at batch 1 is launch-bound long before it is bandwidth-bound: every kernel costs a few
microseconds of GPU time even inside a CUDA graph. This counts, over one call of the engine's step
function, every aten op that launches a kernel on a GPU (views, reshapes and allocations do not) plus
every Triton launch, with the Triton launch heuristics of a GPU with `sms` multiprocessors (split-K and
tile choices depend on it). Host synchronisations (`.item()`, `.tolist()`, ...) are counted apart: a
step that has any cannot be captured as a CUDA graph.

    python -m bench.kernel_budget [--batch 8]   # a small random model, bf16, Triton interpreted (CPU)

Per layer = (step - the same step with no decoder layer) / layers. tests/test_kernel_budget.py keeps
the figure as a budget.
"""
from __future__ import annotations

import contextlib
import os
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ALLOCATIONS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh",
               "_reshape_alias", "set_"}
HOST_SYNCS = {"_local_scalar_dense", "item", "nonzero", "equal", "is_nonzero", "_assert_async"}


def _aliases(out, args) -> bool:
    """An out-of-place op whose result shares memory with an input launched no kernel: views, and
    ops that may hand back their input (.to() of the same dtype, dropout in eval, reshape of a
    contiguous tensor); the same ops count when they had to copy."""
    first = out[0] if isinstance(out, (tuple, list)) and out else out
    if not isinstance(first, torch.Tensor):
        return False
    ptr = first.untyped_storage().data_ptr()
    return any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == ptr for a in args)


class KernelCounter(TorchDispatchMode):
    """Counts kernel-launching aten ops and Triton launches while active (see the module doc)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.triton: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self._inside_triton = 0

    @property
    def total(self) -> int:
        return sum(self.ops.values()) + sum(self.triton.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._inside_triton:  # the interpreter's own copies of the arguments are not kernels
            return out
        name = func.overloadpacket.__name__
        if name in HOST_SYNCS:
            self.syncs[name] += 1
        elif not (name in ALLOCATIONS or (not name.endswith("_") and _aliases(out, args))):
            self.ops[name] += 1
        return out

    @contextlib.contextmanager
    def triton_launches(self, dry: bool = False):
        """Count every Triton launch (compiled or interpreted) by kernel name; dry: do not run them (their
        outputs keep whatever the buffers held: only the count is right, which is all a count needs,
        since a capturable step has no control flow that depends on values)."""
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        saved = {cls: cls.run for cls in (InterpretedFunction, JITFunction)}
        counter = self

        def wrap(run):
            def counted(self, *args, **kwargs):
                counter.triton[getattr(self, "__name__", None) or self.fn.__name__] += 1
                if dry:
                    return None
                counter._inside_triton += 1
                try:
                    return run(self, *args, **kwargs)
                finally:
                    counter._inside_triton -= 1
            return counted

        try:
            for cls, run in saved.items():
                cls.run = wrap(run)
            yield self
        finally:
            for cls, run in saved.items():
                cls.run = run


@contextlib.contextmanager
def gpu_launch_heuristics(sms: int):
    """Make the Triton launchers pick grids as on a GPU with `sms` multiprocessors."""
    from awaker_cli.kernels import lora_moe_triton as lmt

    saved = lmt._num_sms
    lmt._num_sms = lambda device: sms
    try:
        yield
    finally:
        lmt._num_sms = saved


def prepared_buffers(engine, requests, routing=None):
    """Run one short generation so that the buffers of this batch hold a prefilled cache and routing."""
    from awaker_cli.generate import SamplingParams

    state = getattr(engine.model, "awaker_state", None)
    if state is not None:
        state.fixed = routing
    try:
        engine.generate(requests, SamplingParams(max_new_tokens=2, ignore_eos=True))
    finally:
        if state is not None:
            state.fixed = None
    return next(reversed(engine._buffers.values()))


@torch.inference_mode()
def count_step(engine, buf, dry: bool = True) -> KernelCounter:
    """The kernels of one engine decode step on prefilled buffers `buf` (the step runs once) with the
    GPU's choices: Triton kernels where a GPU runs them (dry: launches counted, not run; on the CPU the
    interpreter would take seconds a step)."""
    state = getattr(engine.model, "awaker_state", None)
    if state is not None:
        state.fixed = buf.routing
    counter = KernelCounter()
    forced = os.environ.get("AWAKER_KERNELS")
    os.environ["AWAKER_KERNELS"] = "triton"
    try:
        with counter.triton_launches(dry), counter:
            engine._step(buf)
    finally:
        if forced is None:
            del os.environ["AWAKER_KERNELS"]
        else:
            os.environ["AWAKER_KERNELS"] = forced
        if state is not None:
            state.fixed = None
    return counter


def per_layer(engine, buf, dry: bool = True) -> dict:
    """{"step", "per_layer", "outside_layers", "layers", "host_syncs", "ops", "triton"} of one decode step."""
    full = count_step(engine, buf, dry)
    layers = engine.layers
    try:
        engine.layers = []
        bare = count_step(engine, buf, dry)
    finally:
        engine.layers = layers
    n = len(layers)
    return {"step": full.total, "per_layer": (full.total - bare.total) / n, "outside_layers": bare.total,
            "layers": n, "host_syncs": sum(full.syncs.values()),
            "ops": dict(sorted(((k, v / n) for k, v in (full.ops - bare.ops).items()), key=lambda kv: -kv[1])),
            "triton": {k: v / n for k, v in (full.triton - bare.triton).items()}}


def counting_engine(dtype=torch.bfloat16, layers: int = 2):
    """An Engine on the CPU for counting: a random Qwen2-VL with 7B's head size and widths large enough
    that the GPU's split-K choices happen (hidden 512, MLP 1536, rank 32, 4 experts + global)."""
    from awaker_cli.generate import Engine
    from awaker_cli.tiny import build_processor, qwen2vl_config

    from bench.decode import add_adapters
    from bench.shapes import build_model

    processor = build_processor()
    config = qwen2vl_config(processor.tokenizer, hidden=512, layers=layers, intermediate=1536, heads=4, kv_heads=2)
    model = build_model(config, "cpu", dtype)
    add_adapters(model, processor, rank=32, experts=4)
    return Engine(model, processor)


def main(argv=None):
    import argparse
    import json

    os.environ.setdefault("TRITON_INTERPRET", "1")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sms", type=int, default=132, help="multiprocessors of the GPU to mimic (H100/H200: 132)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    engine = counting_engine()
    with gpu_launch_heuristics(args.sms):
        buf = prepared_buffers(engine, ["how many shapes are there ?"] * args.batch)
        info = per_layer(engine, buf)
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print(f"decode step, batch {args.batch}: {info['step']} kernels, {info['per_layer']:g} per decoder layer "
              f"({info['layers']} layers), {info['outside_layers']} outside the layers, "
              f"{info['host_syncs']} host syncs")
        for name, n in {**info["ops"], **{"triton:" + k: v for k, v in info["triton"].items()}}.items():
            print(f"  {n:5g}  {name}")
    return info


if __name__ == "__main__":
    main()
