"""Data parallel (torchrun, 2 gloo processes on the CPU) × batch b, one process accumulating 2 micro-batches
of b, and one batch of 2b make the same update. Stage 1 with dropout 0, so nothing random is involved;
the records differ in length, so a per-micro-batch mean would not match (the loss is normalised by the
step's label tokens over all processes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from awaker_cli.train import load_recipe
from awaker_cli.train.loop import train
from awaker_cli.train.synthetic import write_synthetic_dataset


def _common(tiny_base, data, out):
    return ["--recipe", "tiny-stage1", f"model={tiny_base}", f"data.train={data}", f"output_dir={out}",
            "train.max_steps=1", "adapter.dropout=0", "train.progress=false", "train.save_dtype=float32",
            "train.lr=1e-2"]


def _metrics(out):
    (line,) = (out / "metrics.jsonl").read_text().splitlines()
    return json.loads(line)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("ddp-data"), n=8, text_only_every=3)


def test_ddp_accumulation_and_big_batch_agree(tiny_base, data, tmp_path):
    ddp, accum, big = tmp_path / "ddp", tmp_path / "accum", tmp_path / "big"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "awaker_cli", "train", *_common(tiny_base, data, ddp), "train.batch_size=2", "train.grad_accum=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr
    for out, b, acc in ((accum, 2, 2), (big, 4, 1)):
        args = _common(tiny_base, data, out)[2:] + [f"train.batch_size={b}", f"train.grad_accum={acc}"]
        train(load_recipe("tiny-stage1", args), quiet=True)
    m = {k: _metrics(v) for k, v in (("ddp", ddp), ("accum", accum), ("big", big))}
    assert m["ddp"]["tokens"] == m["accum"]["tokens"] == m["big"]["tokens"]  # the same records
    for name in ("ddp", "accum"):
        # fp32 sums in a different order: equal to ~1e-6 relative
        assert m[name]["loss"] == pytest.approx(m["big"]["loss"], rel=1e-6)
        assert m[name]["grad_norm"] == pytest.approx(m["big"]["grad_norm"], rel=1e-5)
    weights = {k: load_file(str(v / "model.safetensors")) for k, v in (("ddp", ddp), ("accum", accum), ("big", big))}
    changed = 0
    for key, ref in weights["big"].items():
        for name in ("ddp", "accum"):
            torch.testing.assert_close(weights[name][key], ref, atol=1e-6, rtol=1e-5, msg=f"{name}: {key}")
        changed += key.endswith("lora_B") and bool(ref.abs().sum() > 0)
    assert changed == 14  # one step moved every LoRA B (2 layers × 7 linears)
