"""bench/gpu_check.py --smoke: the prepared GPU run's in-process harness (anchors, engine figures,
graph-vs-eager comparison) on the tiny model on the CPU."""
from __future__ import annotations

import json

from bench import gpu_check


def test_gpu_check_smoke(tmp_path):
    data = gpu_check.main(["--smoke", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == data
    decode = data["stages"]["decode"]
    assert "error" not in decode, decode.get("traceback")
    labels = {(r["model"], r.get("batch")) for r in decode["anchors"] + decode["engine"]}
    assert {("transformers-dense-eager", 1), ("release-style-dispatcher", 2), ("engine-dense", 1),
            ("engine-awaker", 2)} <= labels
    assert any(r["model"].startswith("peft") for r in decode["anchors"])  # measured, or skipped saying why
    assert all(r["tokens_per_s"] > 0 for r in decode["engine"])
    assert decode["graph_vs_eager"]["equal"]
