"""Data parallelism under torchrun (2 gloo processes on the CPU), ddp and fsdp.

Both make the same update as one process taking the step's records in one big batch (stage 1 with
dropout 0, so nothing random is involved; the records differ in length, so a per-micro-batch mean
would not match: the loss is normalised by the step's label tokens over all processes). A sharded
(fsdp) run killed after a checkpoint and resumed ends bit for bit where an uninterrupted run ends."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from awaker_cli.train import load_recipe
from awaker_cli.train.loop import train
from awaker_cli.train.synthetic import write_synthetic_dataset

from .conftest import NEW_FAMILIES, model_tensors

STEPS = 2


def _common(tiny_base, data, out):
    return [f"model={tiny_base}", f"data.train={data}", f"output_dir={out}", f"train.max_steps={STEPS}",
            "train.progress=false", "train.save_dtype=float32", "train.lr=1e-2", "train.logging_steps=1"]


def _torchrun(*args, script=None):
    """`awaker train --recipe tiny-stage1 ARGS` (or `python SCRIPT ARGS`) in 2 processes."""
    target = [str(script)] if script else ["-m", "awaker_cli", "train", "--recipe", "tiny-stage1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *target, *args]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("parallel-data"), n=8, text_only_every=3)


@pytest.fixture(scope="module")
def big_batch(tiny_base, data, tmp_path_factory):
    """One process, the step's 4 records in one batch."""
    out = tmp_path_factory.mktemp("big") / "out"
    train(load_recipe("tiny-stage1", _common(tiny_base, data, out) + ["adapter.dropout=0", "train.batch_size=4",
                                                                      "train.grad_accum=1"]), quiet=True)
    return out


@pytest.mark.parametrize("mode, batch, accum", [("ddp", 2, 1), ("fsdp", 1, 2)])
def test_data_parallel_matches_one_big_batch(tiny_base, data, big_batch, tmp_path, mode, batch, accum):
    """2 processes × batch × accum = 4 records a step; fsdp also accumulates (reducing after each
    micro-batch into its sharded gradients)."""
    out = tmp_path / mode
    proc = _torchrun(*_common(tiny_base, data, out), "adapter.dropout=0", f"train.parallel={mode}",
                     f"train.batch_size={batch}", f"train.grad_accum={accum}")
    assert f"2 process(es) ({mode})" in proc.stderr.replace("\n", " ")
    ours, ref = _metrics(out), _metrics(big_batch)
    assert [m["tokens"] for m in ours] == [m["tokens"] for m in ref]  # the same records, step by step
    for m, r in zip(ours, ref):  # fp32 sums in a different order: equal to ~1e-6 relative
        assert m["loss"] == pytest.approx(r["loss"], rel=1e-6)
        assert m["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-5)
    weights, expected = model_tensors(out), model_tensors(big_batch)
    base = load_file(str(tiny_base / "model.safetensors"))
    assert weights.keys() == expected.keys()
    moved = 0
    for key, ref in expected.items():
        if key in base:  # the frozen base, bit for bit (sharded and gathered back, with fsdp)
            assert torch.equal(weights[key], base[key]), key
        else:
            torch.testing.assert_close(weights[key], ref, atol=1e-6, rtol=1e-5, msg=f"{mode}: {key}")
            moved += key.endswith("lora_B") and bool(ref.abs().sum() > 0)
    assert moved == 14  # training moved every LoRA B (2 layers × 7 linears)


@pytest.mark.parametrize("mode, batch, accum", [("ddp", 2, 1), ("fsdp", 1, 2)])
@pytest.mark.parametrize("fam", NEW_FAMILIES)
def test_data_parallel_on_new_families(fam, family_bases, data, tmp_path, mode, batch, accum):
    """The same on Qwen2.5-VL and Qwen3-VL (q/k norm, DeepStack, its own key layout): 2 processes give
    one process's update, the base stays bit for bit."""
    base_dir = family_bases[fam, "hub"]
    one, out = tmp_path / "one", tmp_path / mode
    train(load_recipe("tiny-stage1", _common(base_dir, data, one) + ["adapter.dropout=0", "train.batch_size=4",
                                                                     "train.grad_accum=1"]), quiet=True)
    _torchrun(*_common(base_dir, data, out), "adapter.dropout=0", f"train.parallel={mode}",
              f"train.batch_size={batch}", f"train.grad_accum={accum}")
    for m, r in zip(_metrics(out), _metrics(one), strict=True):
        assert m["loss"] == pytest.approx(r["loss"], rel=1e-6)
        assert m["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-5)
    weights, expected, base = model_tensors(out), model_tensors(one), model_tensors(base_dir)
    assert weights.keys() == expected.keys()
    for key, ref in expected.items():
        if key in base:
            assert torch.equal(weights[key], base[key]), key
        else:
            # fp32 sums in another order. Adam's first steps move an entry by about lr·sign(gradient), so an
            # entry whose gradient is ~0 (rounding noise) may go either way: allow a handful of those (seen
            # on Qwen2.5-VL's tiny base), the losses and gradient norms above pin the update itself
            off = (weights[key] - ref).abs() > 1e-5 + 1e-5 * ref.abs()
            assert off.sum() <= 2, f"{mode}: {key}: {int(off.sum())} entries differ"


KILLABLE = textwrap.dedent("""
    import sys
    from awaker_cli.train import load_recipe
    from awaker_cli.train.loop import train

    def stop(step, metrics):  # what a kill right after the step-1 checkpoint leaves behind
        if step == 1:
            raise KeyboardInterrupt
    try:
        train(load_recipe("tiny-stage1", sys.argv[1:]), after_step=stop, quiet=True)
    except KeyboardInterrupt:
        pass
""")


def test_fsdp_killed_and_resumed_equals_uninterrupted(tiny_base, data, tmp_path):
    """With dropout (each process's RNG is saved and restored) and Adam moments sharded over processes."""
    script = tmp_path / "killable.py"
    script.write_text(KILLABLE)
    args = ["train.parallel=fsdp", "train.batch_size=1", "train.grad_accum=2", "train.save_steps=1",
            "adapter.dropout=0.1"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    _torchrun(*_common(tiny_base, data, whole), *args)
    _torchrun(*_common(tiny_base, data, killed), *args, script=script)
    (ckpt,) = (killed / "checkpoints").iterdir()
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint.json", "rank-00000.pt", "rank-00001.pt", "state.pt"]
    assert not (killed / "model.safetensors").exists() and not (killed / "awaker_adapters.safetensors").exists()
    proc = _torchrun(*_common(tiny_base, data, killed), *args)
    assert "resuming" in proc.stderr
    a, b = model_tensors(whole), model_tensors(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(killed) == [{**m, "time": n["time"], "tokens_per_s": n["tokens_per_s"]}
                                for m, n in zip(_metrics(whole), _metrics(killed))]


def test_processes_must_see_the_same_output_dir(tmp_path):
    """Processes on machines without a shared filesystem would each resume from what they see: refused."""
    from awaker_cli.errors import AwakerError
    from awaker_cli.train import parallel
    from awaker_cli.train.loop import _check_shared

    class OtherMachineSeesNothing(parallel.Dist):
        def gather_objects(self, obj):
            return [obj, None]

    ctx = OtherMachineSeesNothing(rank=0, world=2, local_rank=0, device=torch.device("cpu"), owns_group=False)
    with pytest.raises(AwakerError, match="filesystem every process shares"):
        _check_shared(ctx, tmp_path, "step-00000002")
    _check_shared(ctx, tmp_path, None)  # nothing to resume on either: the same


@pytest.mark.parametrize("mode, batch, accum", [("ddp", 2, 1), ("fsdp", 1, 2)])
def test_eval_split_over_processes_matches_one_process(tiny_base, data, tmp_path, mode, batch, accum):
    """3 eval records over 2 processes at batch 1 or 2: the shards differ in length (one runs a masked
    record), and the eval loss still equals the one-process evaluation of the same weights."""
    val = write_synthetic_dataset(tmp_path / "val", n=3, seed=2, name="val.jsonl")
    extra = ["adapter.dropout=0", f"data.val={val}", "train.eval_steps=1"]
    one = tmp_path / "one"
    train(load_recipe("tiny-stage1", _common(tiny_base, data, one) + extra + ["train.batch_size=4",
                                                                             "train.grad_accum=1"]), quiet=True)
    out = tmp_path / mode
    _torchrun(*_common(tiny_base, data, out), *extra, f"train.parallel={mode}", f"train.batch_size={batch}",
              f"train.grad_accum={accum}")
    ours = [m for m in _metrics(out) if "eval_loss" in m]
    ref = [m for m in _metrics(one) if "eval_loss" in m]
    assert [m["step"] for m in ours] == [m["step"] for m in ref] == [1, 2]
    for m, r in zip(ours, ref):
        assert m["eval_records"] == 3 and m["eval_loss"] == pytest.approx(r["eval_loss"], rel=1e-5)
    assert (out / "loss.png").is_file()
