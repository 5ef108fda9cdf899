"""`awaker export`: bitsandbytes tensors in transformers' layout, loaded back by transformers and awaker."""
from __future__ import annotations

import json

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

from awaker_cli.checkpoint import Checkpoint
from awaker_cli.cli import run
from awaker_cli.model import load_model
from awaker_cli.generate.engine import graph_blocker
from awaker_cli.ops.export import quantize_weight

from .conftest import chat_inputs, solid

KEY = "model.layers.1.mlp.gate_proj"  # [96, 64]


def export(capsys, *args) -> dict:
    capsys.readouterr()
    assert run(["export", *map(str, args), "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def nf4(random_moe, tiny_records, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "nf4"
    assert run(["export", str(random_moe), str(out), "--quantize", "nf4", "--double-quant",
                "--data", str(tiny_records), "--json"]) == 0
    return out


def test_nf4_layout_and_config(nf4, random_moe, capsys):
    ckpt = Checkpoint(nf4)
    qc = ckpt.config["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4"
    assert qc["bnb_4bit_use_double_quant"] and {"lm_head", "visual", "model.visual"} <= set(qc["llm_int8_skip_modules"])
    t = ckpt.tensors
    for suffix in ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
                   "weight.quant_state.bitsandbytes__nf4"):
        assert f"{KEY}.{suffix}" in t
    assert t[f"{KEY}.weight"].dtype == torch.uint8 and t[f"{KEY}.weight"].numel == 96 * 64 // 2
    assert t["model.layers.0.self_attn.q_proj.bias"].dtype == torch.bfloat16
    # vision tower, lm_head, experts and routers unquantized, in bf16
    for key in ("lm_head.weight", "visual.blocks.0.attn.qkv.weight", f"{KEY}.lora_A", "awaker_routers.gate_weight"):
        assert t[key].dtype == torch.bfloat16
    # the bytes are exactly what bitsandbytes makes of the source weight
    source = Checkpoint(random_moe).get(f"{KEY}.weight")
    ours = quantize_weight(source, "nf4", double_quant=True, dtype=torch.bfloat16)
    assert set(ours) == {k[len(KEY) + 1:] for k in t if k.startswith(KEY + ".weight")}
    for name, tensor in ours.items():
        assert torch.equal(ckpt.get(f"{KEY}.{name}"), tensor), name


@torch.no_grad()
def test_nf4_loads_in_awaker_and_transformers(nf4, random_moe, capsys):
    source = Checkpoint(random_moe).get(f"{KEY}.weight")
    model = load_model(nf4)
    layer = model.model.language_model.layers[1].mlp.gate_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit) and layer.lora_A.dtype == torch.bfloat16
    assert type(model.model.visual.blocks[0].attn.qkv) is torch.nn.Linear
    assert type(model.lm_head) is torch.nn.Linear
    w = layer.base_layer.weight
    restored = bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    # the round trip through the loader gives back bitsandbytes' own dequantization of the source
    ours = bnb.nn.Params4bit(source.to(torch.bfloat16), requires_grad=False, quant_type="nf4",
                             compress_statistics=True).to("cpu")
    assert torch.equal(restored, bnb.functional.dequantize_4bit(ours.data, ours.quant_state).float())
    assert (restored - source).norm() / source.norm() < 0.15
    processor = AutoProcessor.from_pretrained(nf4)
    batch = chat_inputs(processor, ["what colour is the shape ?"], [solid((200, 30, 30))])
    assert torch.isfinite(model(**batch).logits).all()
    # `awaker eval` loads in fp32: unquantized tensors follow, the 4-bit layers keep their compute dtype
    fp32 = load_model(nf4, dtype=torch.float32)
    assert fp32.model.visual.blocks[0].attn.qkv.weight.dtype == torch.float32
    steps = fp32.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert steps.shape[1] == batch["input_ids"].shape[1] + 3
    plain = Qwen2VLForConditionalGeneration.from_pretrained(nf4)  # transformers' own bnb loader (accelerate)
    assert isinstance(plain.model.language_model.layers[1].mlp.gate_proj, bnb.nn.Linear4bit)


def test_report(nf4, capsys, tmp_path, random_moe):
    assert "bitsandbytes (nf4, double quant)" in (nf4 / "README.md").read_text()
    r = export(capsys, random_moe, tmp_path / "again", "--quantize", "nf4", "--double-quant")
    assert r["size_on_disk"] < r["bf16_model_bytes"] and r["linear_ratio"] < 0.5
    assert r["size_ratio"] == pytest.approx(r["size_on_disk"] / r["bf16_model_bytes"])


def test_quality_reported_with_data(random_moe, tiny_records, tmp_path, capsys):
    r = export(capsys, random_moe, tmp_path / "int8", "--quantize", "int8", "--data", tiny_records)
    assert r["loss_after"] == pytest.approx(r["loss_before"], rel=0.05)
    assert r["token_agreement"] > 0.8 and r["routing_agreement"] > 0.8


@pytest.mark.parametrize("method,limit", [("nf4", 0.29), ("fp4", 0.29), ("int8", 0.51)])
def test_size_ratio_at_a_real_width(method, limit):
    """Per weight: 4 bit + an fp32 absmax per 64 weights = 0.281 of bf16; int8 + a row scale ≈ 0.5."""
    W = torch.randn(512, 1024)
    tensors = quantize_weight(W, method, double_quant=False, dtype=torch.bfloat16)
    ratio = sum(t.numel() * t.element_size() for t in tensors.values()) / (W.numel() * 2)
    assert 0.25 < ratio < limit
    if method != "int8":
        dq = quantize_weight(W, method, double_quant=True, dtype=torch.bfloat16)
        assert sum(t.numel() * t.element_size() for t in dq.values()) / (W.numel() * 2) < 0.27


@torch.no_grad()
def test_baked_int8_export_loads_in_plain_transformers(random_moe, tmp_path, capsys):
    dense = tmp_path / "dense"
    assert run(["merge", str(random_moe), str(dense), "--expert", "1", "--p", "0.6", "--json"]) == 0
    out = tmp_path / "int8"
    r = export(capsys, dense, out, "--quantize", "int8", "--dtype", "fp16")
    assert r["kind"] == "qwen2-vl" and not (out / "awaker_config.json").exists()
    model = Qwen2VLForConditionalGeneration.from_pretrained(out)
    layer = model.model.language_model.layers[1].mlp.gate_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt)
    # threshold 0: no host-side outlier check per call, so the engine can capture decode as a CUDA graph
    assert Checkpoint(out).config["quantization_config"]["llm_int8_threshold"] == 0.0
    assert layer.state.threshold == 0.0 and graph_blocker(model) is None
    layer.state.threshold = 6.0
    assert "outlier threshold 6" in graph_blocker(model)
    layer.state.threshold = 0.0
    source = Checkpoint(dense).get(f"{KEY}.weight")
    ours = quantize_weight(source, "int8", double_quant=False, dtype=torch.float16)
    assert torch.equal(layer.weight.data, ours["weight"]) and torch.equal(layer.weight.SCB, ours["SCB"])
    restored = layer.weight.data.float() * layer.weight.SCB[:, None] / 127
    assert (restored - source).abs().max() <= source.abs().max() / 127
    reference = Qwen2VLForConditionalGeneration.from_pretrained(dense)
    processor = AutoProcessor.from_pretrained(out)
    batch = chat_inputs(processor, ["what colour is the shape ?"], [solid((200, 30, 30))])
    a, b = model(**batch).logits.float(), reference(**batch).logits
    assert (a - b).abs().max() < 0.1 * b.abs().max()


def test_export_errors(nf4, random_moe, tmp_path, capsys):
    def error(*args):
        capsys.readouterr()
        assert run(["export", *map(str, args)]) == 2
        return capsys.readouterr().err

    out = tmp_path / "out"
    assert "4-bit" in error(random_moe, out, "--quantize", "int8", "--double-quant")
    assert "must be one of" in error(random_moe, out, "--quantize", "int3")
    assert "quantized export" in error(nf4, out)
    assert "is the input" in error(random_moe, random_moe, "--force")
    r = export(capsys, random_moe, out, "--dry-run")
    assert r["estimated_bytes"] < r["bf16_model_bytes"] and not out.exists()
    capsys.readouterr()
    assert run(["merge", str(nf4), str(out)]) == 2
    assert "quantized export" in capsys.readouterr().err


@torch.no_grad()
@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_quantized_experts_round_trip(random_moe, tmp_path, capsys, method):
    out = tmp_path / method
    export(capsys, random_moe, out, "--quantize", method, "--quantize-experts")
    key = "model.layers.0.mlp.down_proj.lora_B"  # [5, 64, 8]
    stored = Checkpoint(out).tensors[key]
    assert stored.dtype == (torch.int8 if method == "int8" else torch.uint8)
    source = Checkpoint(random_moe).get(key)
    loaded = dict(load_model(out).named_parameters())["model.language_model.layers.0.mlp.down_proj.lora_B"]
    assert loaded.shape == source.shape and loaded.dtype == torch.bfloat16
    assert (loaded.float() - source).norm() / source.norm() < (0.02 if method == "int8" else 0.15)
    assert Qwen2VLForConditionalGeneration.from_pretrained(out) is not None  # transformers skips these tensors
