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


# ---------------------------------------------------------------------------------------------
# The benchmarks' --family (shapes in bench/shapes.py), at tiny scale on the CPU
# ---------------------------------------------------------------------------------------------

import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from awaker_cli.tiny import build_processor  # noqa: E402
from bench.shapes import SHAPES, build_model, real_config  # noqa: E402

from .conftest import NEW_FAMILIES, needs_interpreter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("family,billions", [("qwen2_vl", 8.29), ("qwen2_5_vl", 8.29), ("qwen3_vl", 8.77)])
def test_bench_shapes_are_the_published_models(family, billions):
    """The 7B/8B configs the GPU benchmarks build (on the meta device here) have the published
    parameter counts (Qwen2-VL-7B and Qwen2.5-VL-7B 8.29 B, Qwen3-VL-8B 8.77 B, vision tower included)
    and their family's transformers class."""
    processor = build_processor(family=family)
    model = build_model(real_config(family, processor.tokenizer), "meta", torch.bfloat16)
    assert model.config.model_type == family
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == billions
    text = model.config.get_text_config()
    s = SHAPES[family]
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.num_key_value_heads,
            model.lm_head.out_features) == (s.hidden, s.intermediate, s.layers, s.kv_heads, s.vocab)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_decode_bench_smoke_per_family(family):
    """bench/decode.py --family on the family's tiny model: dense and awaker, with an image, mixed batch."""
    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "bench" / "decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    info = bench.main(["--smoke", "--family", family, "--batches", "1,2", "--new-tokens", "3",
                       "--prompt-tokens", "24", "--repeats", "1"])
    assert info["family"] == family
    cases = {(r["model"], r["case"]) for r in info["results"]}
    assert cases == {(m, c) for m in ("dense", "awaker") for c in ("b1", "b1+image", "b2-mixed")}
    assert all(r["tokens_per_s"] > 0 and r["new_tokens"] == 3 for r in info["results"])
    image = next(r for r in info["results"] if r["case"] == "b1+image")
    plain = next(r for r in info["results"] if r["case"] == "b1")
    assert image["prompt_tokens"] > plain["prompt_tokens"]  # the image's tokens went in


@needs_interpreter
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_kernels_bench_smoke_per_family(family):
    """bench/kernels.py --family --quick at the family's widths / 64 through the interpreter: every
    LoRA-MoE linear agrees with its reference and routing picks the reference's experts."""
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "kernels.py"), "--smoke", "--quick", "--json",
                          "--family", family], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert (out["family"], out["shapes"]) == (family, SHAPES[family].label)
    dims = {(r["linear"], r["seqs"], r["tokens"]) for r in out["lora_moe"]}
    assert dims == {(name, n, 1) for name in SHAPES[family].linears for n in (1, 3)}  # decode only
    assert all(r["rel_err"] < 3e-2 for r in out["lora_moe"])
    assert all(r["same_ids"] for r in out["routing"])
