"""Upcycling: base tensors copied bit for bit from every layout, and the new model computes what the base does."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor

from awaker_cli.checkpoint import Checkpoint
from awaker_cli.checkpoint.keys import to_hub
from awaker_cli.cli import run
from awaker_cli.model import AwakerConfig, load_base, load_model

from .conftest import assert_base_copied, chat_inputs, solid


@pytest.mark.parametrize("variant", ["hub", "hub-sharded", "v5", "v5-sharded", "flat-config"])
def test_base_tensors_bit_identical(tiny_bases, tmp_path, variant):
    base_dir = tiny_bases[variant]
    out = tmp_path / "moe"
    assert run(["upcycle", str(base_dir), str(out), "--rank", "4", "--max-shard-size", "300KB", "--json"]) == 0
    base, moe = assert_base_copied(base_dir, out)
    assert len(moe.files) > 1, "300KB shards should split the output"
    for file in moe.files:  # the shards are standard safetensors, readable by the reference library
        stored = load_file(file)
        assert set(stored) == {i.name for i in moe.tensors.values() if i.file == file}
    assert (out / "config.json").read_bytes() == (base_dir / "config.json").read_bytes()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (base_dir / name).read_bytes()
    cfg = AwakerConfig.load(out)
    assert cfg.rank == 4 and cfg.num_layers == 2 and set(cfg.span_token_ids) == {"im_start", "im_end", "vision_start"}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(moe.tensors)


def test_copied_tensors_keep_their_page_offset(tiny_bases, tmp_path):
    """Each output shard's data starts so that its copied base tensors sit at the same position modulo
    the page size as in their source file (whole-page in-kernel copies), and stays 8-byte aligned."""
    base = Checkpoint(tiny_bases["hub-sharded"])
    out = tmp_path / "moe"
    assert run(["upcycle", str(base.path), str(out), "--rank", "4", "--max-shard-size", "300KB"]) == 0
    moe = Checkpoint(out)
    checked = 0
    for file in moe.files:
        infos = sorted((i for i in moe.tensors.values() if i.file == file), key=lambda i: i.offset)
        assert min(i.offset for i in infos) % 8 == 0
        first = next((i for i in infos if to_hub(i.name) in base.tensors), None)
        if first is not None and base.tensors[to_hub(first.name)].offset % 8 == 0:
            assert first.offset % 4096 == base.tensors[to_hub(first.name)].offset % 4096
            checked += 1
    assert checked >= 2


def test_index_written_in_hub_layout(tiny_bases, tmp_path):
    out = tmp_path / "moe"
    assert run(["upcycle", str(tiny_bases["v5-sharded"]), str(out), "--rank", "4", "--json"]) == 0
    keys = Checkpoint(out).tensors
    assert all(k.split(".")[0] in ("model", "visual", "lm_head", "awaker_routers") for k in keys)
    assert not any(k.startswith("model.language_model") or k.startswith("model.visual") for k in keys)
    raw = list(Checkpoint(out).tensors.values())[0].name
    assert not raw.startswith("model.language_model")


@pytest.fixture(scope="module")
def base_and_moe(tiny_base, tiny_moe):
    return load_base(tiny_base)[0], load_model(tiny_moe), AutoProcessor.from_pretrained(tiny_moe)


@torch.no_grad()
def test_upcycled_logits_equal_base_text(base_and_moe):
    base, moe, processor = base_and_moe
    inputs = chat_inputs(processor, ["what colour is the shape ?", "how many shapes are there in the picture ?"])
    assert torch.equal(moe(**inputs).logits, base(**inputs).logits)


@torch.no_grad()
def test_upcycled_logits_equal_base_image(base_and_moe):
    base, moe, processor = base_and_moe
    inputs = chat_inputs(processor, ["what colour is the shape ?", "describe the image ."],
                         images=[solid((200, 30, 30)), solid((20, 40, 220), size=(56, 112))])
    assert "pixel_values" in inputs and "mm_token_type_ids" in inputs
    assert torch.equal(moe(**inputs).logits, base(**inputs).logits)


def test_dry_run_writes_nothing(tiny_base, tmp_path, capsys):
    out = tmp_path / "moe"
    assert run(["upcycle", str(tiny_base), str(out), "--rank", "4", "--dry-run", "--json"]) == 0
    assert not out.exists()
    plan = json.loads(capsys.readouterr().out)
    assert plan["adapter_params"] > 0 and plan["base_tensors"] == len(Checkpoint(tiny_base).tensors)
    # 2 layers x (3 LoRA targets x 2 + 4 MoE targets x 2) + 3 router tensors
    assert plan["adapter_tensors"] == 2 * (3 * 2 + 4 * 2) + 3


def test_routing_span_rule_chosen_at_upcycle(tiny_base, tmp_path, capsys):
    out = tmp_path / "moe"
    assert run(["upcycle", str(tiny_base), str(out), "--rank", "4", "--routing-span", "prompt-text"]) == 0
    assert AwakerConfig.load(out).routing_span == "prompt-text"
    assert run(["upcycle", str(tiny_base), str(tmp_path / "bad"), "--routing-span", "text"]) == 2
    assert "routing_span must be one of prompt, prompt-text, all" in capsys.readouterr().err


def test_info_reports_parameters(tiny_moe, capsys):
    assert run(["info", str(tiny_moe), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = AwakerConfig.load(tiny_moe)
    p = info["parameters"]
    assert info["kind"] == "awaker" and info["missing_files"] == []
    assert p["total"] == sum(t.numel for t in Checkpoint(tiny_moe).tensors.values())
    # top-1 + global = 2 of 5 slots of every MoE linear are active per token
    assert p["active_per_token"] == p["total"] - p["moe_experts"] + p["moe_experts"] * 2 // cfg.num_slots
    assert info["awaker"]["routers"] == 4


def test_save_model_round_trip(tiny_moe, tmp_path):
    """A loaded model with changed adapters saves and loads back to identical logits."""
    from awaker_cli.model import save_model

    from .conftest import randomize_adapters

    model = load_model(tiny_moe)
    randomize_adapters(model, seed=5)
    out = save_model(model, tmp_path / "saved", tiny_moe, title="test")
    again = load_model(out)
    processor = AutoProcessor.from_pretrained(out)
    inputs = chat_inputs(processor, ["what colour is the shape ?"], images=[solid((1, 2, 3))])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, again(**inputs).logits)
    base = Checkpoint(tiny_moe)
    saved = Checkpoint(out)
    assert set(saved.tensors) == set(base.tensors)


def test_hub_id_resolved_from_local_cache(tiny_base, tmp_path, monkeypatch, capsys):
    """`awaker upcycle org/name OUT` finds a model already in huggingface_hub's cache, offline."""
    import shutil

    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-vl" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_base, snapshot)
    (cache / "models--acme--tiny-vl" / "refs").mkdir()
    (cache / "models--acme--tiny-vl" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    out = tmp_path / "moe"
    assert run(["upcycle", "acme/tiny-vl", str(out), "--rank", "4", "--json"]) == 0
    assert Checkpoint(out).tensors
    capsys.readouterr()
    assert run(["info", "acme/not-cached"]) == 2
    assert "not a hub id in the local cache" in capsys.readouterr().err
