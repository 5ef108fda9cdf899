"""Qwen2.5-VL and Qwen3-VL: the family registry, make-tiny, upcycle (bit-identical base, equal logits on
text and images through the real processor), info, and the vision tower left alone."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoProcessor

from awaker_cli.checkpoint import Checkpoint
from awaker_cli.cli import run
from awaker_cli.model import AwakerConfig, load_base, load_model
from awaker_cli.model.families import FAMILIES, family
from awaker_cli.model.layers import LoRALinear, MoELoRALinear

from .conftest import NEW_FAMILIES, assert_base_copied, chat_inputs, solid

CASES = [(fam, layout) for fam in NEW_FAMILIES for layout in ("hub", "v5")]


def test_registry_entries_load_their_transformers_classes():
    for fam in FAMILIES.values():
        assert fam.load_class().__name__ == fam.model_class
        assert fam.load_processor_class().__name__ == fam.processor_class
        fam.modeling()  # importable
    # Qwen3-VL's hub names are transformers 5's; the Qwen2 families keep the original layout.
    assert family("qwen3_vl").disk_key("model.layers.0.mlp.up_proj.weight") == \
        "model.language_model.layers.0.mlp.up_proj.weight"
    assert family("qwen3_vl").disk_key("visual.blocks.0.attn.qkv.weight") == "model.visual.blocks.0.attn.qkv.weight"
    assert family("qwen3_vl").disk_key("lm_head.weight") == "lm_head.weight"
    assert family("qwen2_5_vl").disk_key("model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"


@pytest.mark.parametrize("fam", NEW_FAMILIES)
def test_make_tiny_family(fam, tmp_path, capsys):
    out = tmp_path / "tiny"
    assert run(["make-tiny", str(out), "--family", fam]) == 0
    model, ckpt = load_base(out)
    assert type(model).__name__ == FAMILIES[fam].model_class and ckpt.family.name == fam
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == FAMILIES[fam].processor_class
    assert "<|im_start|>assistant" in processor.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True)


def test_make_tiny_unknown_family(tmp_path, capsys):
    assert run(["make-tiny", str(tmp_path / "x"), "--family", "llava"]) == 2
    assert "llava" in capsys.readouterr().err


@pytest.mark.parametrize("fam,layout", CASES)
def test_upcycle_family_bit_identical(family_bases, tmp_path, fam, layout):
    base_dir = family_bases[fam, layout]
    out = tmp_path / "moe"
    assert run(["upcycle", str(base_dir), str(out), "--rank", "4", "--max-shard-size", "300KB", "--json"]) == 0
    base, moe = assert_base_copied(base_dir, out)
    assert AwakerConfig.load(out).family == fam
    # Written in the family's hub layout, which its own transformers class loads without a mapping.
    names = {info.name for info in moe.tensors.values()}
    expected = FAMILIES[fam].disk_key("model.layers.0.self_attn.q_proj.lora_A")
    assert expected in names


@pytest.mark.parametrize("fam,layout", CASES)
@torch.no_grad()
def test_upcycled_family_logits_equal_base(family_bases, tmp_path, fam, layout):
    base_dir = family_bases[fam, layout]
    out = tmp_path / "moe"
    assert run(["upcycle", str(base_dir), str(out), "--rank", "4", "--json"]) == 0
    base, moe = load_base(base_dir)[0], load_model(out)
    processor = AutoProcessor.from_pretrained(out)
    text = chat_inputs(processor, ["what colour is the shape ?", "how many shapes are there in the picture ?"])
    assert torch.equal(moe(**text).logits, base(**text).logits)
    images = chat_inputs(processor, ["what colour is the shape ?", "describe the image ."],
                         images=[solid((200, 30, 30)), solid((30, 40, 220), (56, 112))])
    assert images["pixel_values"].numel() > 0
    assert torch.equal(moe(**images).logits, base(**images).logits)


@pytest.mark.parametrize("fam", NEW_FAMILIES)
@torch.no_grad()
def test_random_adapters_change_family_logits(family_bases, family_moes, fam):
    """The adapters are live in every family: non-zero LoRA B changes the logits."""
    base, moe = load_base(family_bases[fam, "hub"])[0], load_model(family_moes[fam])
    processor = AutoProcessor.from_pretrained(family_moes[fam])
    inputs = chat_inputs(processor, ["what colour is the shape ?"], images=[solid((200, 30, 30))])
    assert not torch.allclose(moe(**inputs).logits, base(**inputs).logits, atol=1e-3)


def test_qwen2_5_vl_vision_tower_never_wrapped(family_moes):
    """Qwen2.5-VL's vision blocks have gate/up/down_proj too: only the language model's are adapters."""
    model = load_model(family_moes["qwen2_5_vl"])
    vision_mlp = [n for n, _ in model.model.visual.named_modules() if n.endswith(("gate_proj", "up_proj", "down_proj"))]
    assert vision_mlp, "the tiny Qwen2.5-VL vision tower should have gate/up/down_proj"
    wrapped = [n for n, m in model.named_modules() if isinstance(m, (LoRALinear, MoELoRALinear))]
    assert wrapped and all(n.startswith("model.language_model.layers.") for n in wrapped)
    assert not any(isinstance(m, (LoRALinear, MoELoRALinear)) for m in model.model.visual.modules())
    stored = Checkpoint(family_moes["qwen2_5_vl"]).tensors
    assert not any(k.startswith("visual.") and k.endswith((".lora_A", ".lora_B")) for k in stored)


@pytest.mark.parametrize("fam", NEW_FAMILIES)
def test_info_names_family(family_moes, fam, capsys):
    assert run(["info", str(family_moes[fam]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == FAMILIES[fam].label and report["awaker"]["family"] == fam
    params = report["parameters"]
    assert params["vision"] > 0 and params["language_model"] > 0 and params["moe_experts"] > 0
    assert run(["info", str(family_moes[fam])]) == 0
    captured = capsys.readouterr()
    assert FAMILIES[fam].label in captured.out + captured.err


# The generation engine drives each family's decoder layers itself: its greedy answers and routes must be
# what transformers' own generate gives (Qwen3-VL: q/k norm, interleaved mrope, DeepStack at prefill).
ENGINE_REQUESTS = [
    [{"role": "user", "content": [{"type": "image", "image": solid((200, 30, 30))},
                                  {"type": "text", "text": "what colour is the shape ?"}]}],
    "how many shapes are there ?",
    [{"role": "user", "content": [{"type": "image", "image": solid((20, 200, 40), (56, 112))},
                                  {"type": "text", "text": "read the digit ."}]}],
    [{"role": "system", "content": "answer with a word ."},
     {"role": "user", "content": "describe the image in a few words please ."}],
]


@pytest.mark.parametrize("fam", NEW_FAMILIES)
@torch.no_grad()
def test_engine_equals_transformers_generate(family_moes, fam):
    from awaker_cli.generate import Engine, SamplingParams

    n = 6
    torch.set_num_threads(1)  # tiny kernels on a shared machine
    processor = AutoProcessor.from_pretrained(family_moes[fam])
    model, reference = load_model(family_moes[fam]), load_model(family_moes[fam])
    if fam == "qwen3_vl":  # make the DeepStack features big enough to decide the tiny model's tokens
        for m in (model, reference):
            for merger in m.model.visual.deepstack_merger_list:
                merger.linear_fc2.weight.mul_(30)
    engine = Engine(model, processor)
    gens = engine.generate(ENGINE_REQUESTS, SamplingParams(max_new_tokens=n, ignore_eos=True))
    routes = {tuple(r) for r in engine.last_routing.expert_ids[:, :, 0].tolist()}
    assert len(routes) > 1, "the batch should mix routes"
    for request, g in zip(ENGINE_REQUESTS, gens):
        inputs = engine.encode([request])
        out = reference.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        routing = reference.awaker_state.current
        assert g.tokens == out[0, inputs["input_ids"].shape[1]:].tolist()
        assert torch.equal(g.routing.expert_ids, routing.expert_ids)
        torch.testing.assert_close(g.routing.probs, routing.probs)
