"""What merge, prune and export share: opening a source safely, streaming its tensors through a
transform one module at a time, low-rank re-factorisation, and measuring a model on a data file."""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from ..checkpoint import (DEFAULT_SHARD_SIZE, Checkpoint, Entry, ShardWriter, atomic_output_dir, check_free_space,
                          check_output_dir, copy_processor_files, write_model_card)
from ..checkpoint.base_ref import base_record, write_adapter_only
from ..checkpoint.keys import ADAPTER_SUFFIXES, ROUTER_PREFIX, lm_linear
from ..errors import AwakerError
from ..kernels.routing_ref import router_inputs as ref_router_inputs
from ..kernels.routing_ref import router_probs as ref_router_probs
from ..model.config import CONFIG_NAME, AwakerConfig
from ..progress import no_bar

Tensors = list[tuple[str, torch.Tensor]]
QUANT_SUFFIXES = (".absmax", ".quant_map", ".SCB", ".weight_format", ".nested_absmax", ".nested_quant_map")


def is_quantized(ckpt: Checkpoint) -> bool:
    return "quantization_config" in ckpt.config or any(
        k.endswith(QUANT_SUFFIXES) or ".quant_state." in k for k in ckpt.tensors)


def open_source(path, command: str, *, awaker: bool = True,
                quantized_ok: bool = False) -> tuple[Checkpoint, AwakerConfig | None]:
    """The source checkpoint (and its AwakerConfig), refusing what `command` cannot work on."""
    ckpt = Checkpoint(path)
    if not quantized_ok and is_quantized(ckpt):
        then = "" if command == "export" else f" (run {command} first, then `awaker export`)"
        raise AwakerError(f"{ckpt.path}: is a quantized export; {command} needs the full-precision model{then}")
    has_cfg = (ckpt.path / CONFIG_NAME).exists()
    if awaker and not has_cfg:
        raise AwakerError(f"{ckpt.path}: not an awaker model (no {CONFIG_NAME}); {command} works on LoRA-MoE models")
    return ckpt, AwakerConfig.load(ckpt.path) if has_cfg else None


def check_target(source: Checkpoint, out: str | Path, force: bool, data: str | Path | None = None,
                 needed: int | None = None):
    """Before any work: OUT may not be, contain or lie inside the source model or the data file (with
    --force that would destroy them), and replaces only an earlier awaker output; with `needed` (bytes),
    the free space is checked too."""
    check_output_dir(out, force, inputs=[*source.input_paths, data])
    if needed is not None:
        check_free_space(Path(out).expanduser().parent, needed, "the output")


def module_paths(cfg: AwakerConfig) -> list[tuple[int, str, str]]:
    """(layer, projection, hub module path) of every adapter linear, LoRA targets first."""
    from ..checkpoint.keys import lm_module_path

    return [(i, p, lm_module_path(i, p)) for i in range(cfg.num_layers) for p in (*cfg.lora_targets, *cfg.moe_targets)]


def stream(ckpt: Checkpoint, *, weight: Callable[[str, torch.Tensor], Tensors | None] | None = None,
           adapter: Callable[[str, torch.Tensor, torch.Tensor], Tensors] | None = None,
           routers: Callable[[dict[str, torch.Tensor]], Tensors] | None = None,
           other: Callable[[str, torch.Tensor], Tensors] | None = None,
           progress: Callable[[int], None] | None = None,
           adapters_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the output tensors of `ckpt` in on-disk order, one source tensor (or module) at a time.
    adapters_only: the adapters and routers alone (the base tensors are not even read).

    weight(module path, W): for language-model linear weights; None keeps W as it is.
    adapter(module path, A, B): for each adapter module (both halves read together).
    routers({name: tensor}): the router bank, emitted last.
    other(key, tensor): everything else (default: unchanged).
    """
    done = set()
    bank = {}
    base = ckpt.base_tensors() if adapters_only else {}
    for key in ckpt.ordered_keys():
        if key in base:
            continue
        nbytes = ckpt.tensors[key].nbytes
        if key.startswith(ROUTER_PREFIX):
            bank[key[len(ROUTER_PREFIX):]] = ckpt.get(key)
        elif key.endswith(ADAPTER_SUFFIXES):
            path = key.rsplit(".", 1)[0]
            if path not in done:
                done.add(path)
                A, B = ckpt.get(path + ".lora_A"), ckpt.get(path + ".lora_B")
                yield from adapter(path, A, B) if adapter else [(path + ".lora_A", A), (path + ".lora_B", B)]
        else:
            tensor = ckpt.get(key)
            parsed = lm_linear(key)
            result = weight(key[:-len(".weight")], tensor) if weight and parsed and parsed[2] == "weight" else None
            if result is None:
                result = other(key, tensor) if other else [(key, tensor)]
            yield from result
        if progress:
            progress(nbytes)
    if bank:
        yield from routers(bank) if routers else [(ROUTER_PREFIX + k, v) for k, v in bank.items()]


def write_output(out: str | Path, source: Checkpoint, tensors: Iterable[tuple[str, torch.Tensor]], *,
                 force: bool, awaker_config: AwakerConfig | None, title: str, card: list[str],
                 config_json: dict | None = None, max_shard_size: int = DEFAULT_SHARD_SIZE,
                 adapter_only: bool = False) -> dict:
    """Write a model directory atomically: the streamed tensors, config.json (the source's unless
    given), awaker_config.json (if any), the processor files and a model card.
    adapter_only: the tensors are adapters and routers alone (stream(adapters_only=True)), written as an
    adapter-only directory on the source's base (checkpoint/base_ref.py)."""
    record = base_record(source, Path(out)) if adapter_only else None
    with atomic_output_dir(out, force, inputs=source.input_paths) as tmp:
        if adapter_only:  # adapters and routers only: small enough to be held until written in one file
            entries = [Entry.of(key, t.detach().contiguous()) for key, t in tensors]
            shards = write_adapter_only(tmp, entries, record, source.family.disk_key)
        else:
            writer = ShardWriter(tmp, max_shard_size, key_map=source.family.disk_key)
            for key, t in tensors:
                writer.add(key, t.detach().contiguous())
            shards = writer.close()
        if config_json is None:
            shutil.copy2(source.path / "config.json", tmp / "config.json")
        else:
            (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        if awaker_config is not None:
            awaker_config.save(tmp)
        copy_processor_files(source.path, tmp)
        write_model_card(tmp, title, card, source=source.path)
    out = Path(out)
    return {"output": str(out), "shards": len(shards), "size_on_disk": dir_size(out)}


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file() and f.suffix == ".safetensors")


@torch.no_grad()
def lowrank(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best rank-`rank` factorisation B' A' of the product B A (B [out, K], A [K, in]), in fp32.

    QR of both factors reduces the SVD to a K×K core, so the [out, in] product is never formed.
    Returns B' [out, rank], A' [rank, in] (√σ on each side) and the squared singular values kept and
    in total (the "energy"). Missing rank (K < rank) is padded with zeros, which adds nothing.
    """
    Qb, Rb = torch.linalg.qr(B.float())
    Qa, Ra = torch.linalg.qr(A.float().T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
    k = min(rank, S.shape[0])
    root = S[:k].sqrt()
    new_B = torch.zeros(B.shape[0], rank)
    new_A = torch.zeros(rank, A.shape[1])
    new_B[:, :k] = (Qb @ U[:, :k]) * root
    new_A[:k] = root[:, None] * (Vh[:k] @ Qa.T)
    energy = S.pow(2)
    return new_B, new_A, float(energy[:k].sum()), float(energy.sum())


def router_inputs(bank: dict[str, torch.Tensor], span_means: torch.Tensor, eps: float) -> torch.Tensor:
    """[N, R, H] what each router's gate sees for router inputs span_means [N, H], in fp32: the
    reference routing math (kernels.routing_ref) on the checkpoint's router bank."""
    return ref_router_inputs(span_means.float(), bank["norm_weight"].float(), eps=eps)


def router_probs(bank: dict[str, torch.Tensor], span_means: torch.Tensor, eps: float,
                 temperature: float) -> torch.Tensor:
    """[N, R, E] every expert's router probability (eval mode: no noise), in fp32."""
    return ref_router_probs(span_means.float(), bank["norm_weight"].float(), bank["gate_weight"].float(),
                            bank["gate_bias"].float(), eps=eps, temperature=temperature)


def load_any(path: str | Path, dtype: torch.dtype | None = None):
    """An awaker model (adapters attached) or a plain dense model of a supported family, whichever the directory holds."""
    from ..model import load_base, load_model

    if (Path(path) / CONFIG_NAME).exists():
        return load_model(path, dtype)
    return load_base(path, dtype)[0]


def measure(path: str | Path, records, *, batch_size: int = 4, bar=no_bar, what: str = "measure",
            dtype: torch.dtype | None = None, min_pixels: int | None = None, max_pixels: int | None = None):
    """Load the model at `path`, run it over `records` (ops.records.run_data) and free it."""
    from .records import load_processor, run_data

    model = load_any(path, dtype)
    with bar(f"{what} on data", len(records), unit="records") as advance:
        return run_data(model, load_processor(path), records, batch_size=batch_size, progress=advance,
                        min_pixels=min_pixels, max_pixels=max_pixels)
