"""`awaker merge`: folded LoRA, baked dense models (checked in plain transformers) and merged experts."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

from awaker_cli.checkpoint import Checkpoint
from awaker_cli.cli import run
from awaker_cli.model import Routing, load_model
from awaker_cli.ops.records import read_records, run_data

from .conftest import chat_inputs, solid

PROMPTS = ["what colour is the shape ?", "read the digit ."]
IMAGES = [solid((200, 30, 30)), solid((20, 200, 40), (56, 112))]


def merge(capsys, *args) -> dict:
    capsys.readouterr()
    assert run(["merge", *map(str, args), "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def error(capsys, *args) -> str:
    capsys.readouterr()
    assert run(["merge", *map(str, args)]) == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def source(random_moe):
    model = load_model(random_moe)
    return model, AutoProcessor.from_pretrained(random_moe), chat_inputs(
        AutoProcessor.from_pretrained(random_moe), PROMPTS, IMAGES)


@torch.no_grad()
def logits_under(model, batch, routing: Routing | None = None):
    model.awaker_state.fixed = None if routing is None else routing.select(torch.zeros(2, dtype=torch.long))
    try:
        return model(**batch).logits
    finally:
        model.awaker_state.fixed = None


@torch.no_grad()
def test_fold_lora_keeps_outputs(source, random_moe, tmp_path, capsys):
    model, _, batch = source
    out = tmp_path / "folded"
    result = merge(capsys, random_moe, out)
    assert result["mode"] == "fold-lora" and result["folded_modules"] == 2 * 3
    folded = load_model(out)
    assert folded.awaker_config.lora_targets == []
    assert not any(k.endswith("q_proj.lora_A") for k in Checkpoint(out).tensors)
    torch.testing.assert_close(folded(**batch).logits, logits_under(model, batch), atol=2e-5, rtol=1e-5)
    assert torch.equal(folded.awaker_state.current.expert_ids, model.awaker_state.current.expert_ids)


@pytest.mark.parametrize("combine", ["release", "convex"])
@torch.no_grad()
def test_bake_expert_equals_moe_in_plain_transformers(source, random_moe, tmp_path, capsys, combine):
    src = random_moe
    if combine != "release":  # the same weights read as a convex-mix model
        src = tmp_path / "convex"
        shutil.copytree(random_moe, src)
        cfg = json.loads((src / "awaker_config.json").read_text())
        (src / "awaker_config.json").write_text(json.dumps({**cfg, "combine": "convex"}))
    model = load_model(src)
    batch = source[2]
    out = tmp_path / "dense"
    merge(capsys, src, out, "--expert", 2, "--p", 0.7)
    assert not (out / "awaker_config.json").exists()
    dense = Qwen2VLForConditionalGeneration.from_pretrained(out).eval()
    cfg = model.awaker_config
    routing = Routing.from_probs(torch.full((1, cfg.num_routers, 1), 2), torch.full((1, cfg.num_routers, 1), 0.7),
                                 combine, True)
    expected = logits_under(model, batch, routing)
    torch.testing.assert_close(dense(**batch).logits, expected, atol=2e-5, rtol=1e-5)
    # and the routing mattered: another expert or the natural routing gives other logits
    assert not torch.allclose(expected, logits_under(model, batch), atol=1e-3)


@torch.no_grad()
def test_bake_routing_the_data_picks_most(source, random_moe, tiny_records, tmp_path, capsys):
    model, processor, batch = source
    out = tmp_path / "dense"
    result = merge(capsys, random_moe, out, "--data", tiny_records)
    # the reported routing is the most common choice of each router on the data
    run_ = run_data(model, processor, read_records(tiny_records))
    for r, entry in enumerate(result["routing"]):
        counts = torch.bincount(run_.expert_ids[:, r, 0], minlength=4)
        assert counts[entry["experts"][0]] == counts.max()
        assert entry["share_of_records"] == pytest.approx(float(counts.max()) / len(run_.tasks), abs=1e-4)
    ids = torch.tensor([[r["experts"] for r in result["routing"]]])
    probs = torch.tensor([[r["p"] for r in result["routing"]]])
    routing = Routing.from_probs(ids, probs, "release", True)
    dense = Qwen2VLForConditionalGeneration.from_pretrained(out).eval()
    torch.testing.assert_close(dense(**batch).logits, logits_under(model, batch, routing), atol=2e-5, rtol=1e-5)


def _product(path, key, e):
    c = Checkpoint(path)
    scaling = json.loads((path / "awaker_config.json").read_text())
    scaling = scaling["alpha"] / scaling["rank"]
    return scaling * c.get(key + ".lora_B")[e].double() @ c.get(key + ".lora_A")[e].double()


def test_merge_experts_keep_rank_sum_is_exact(random_moe, tmp_path, capsys):
    out = tmp_path / "merged"
    result = merge(capsys, random_moe, out, "--experts", "1,3", "--keep-rank-sum")
    assert result["new_index"] == {"0": 0, "1": 1, "2": 2, "3": 1}
    cfg = json.loads((out / "awaker_config.json").read_text())
    assert (cfg["num_experts"], cfg["rank"], cfg["alpha"]) == (3, 16, 32.0)  # scaling alpha/rank unchanged
    key = "model.layers.1.mlp.down_proj"
    mean = (_product(random_moe, key, 1) + _product(random_moe, key, 3)) / 2
    torch.testing.assert_close(_product(out, key, 1), mean, atol=1e-6, rtol=1e-6)
    for old, new in ((0, 0), (2, 2), (4, 3)):  # untouched experts and the global expert keep their product
        torch.testing.assert_close(_product(out, key, new), _product(random_moe, key, old), atol=1e-6, rtol=1e-6)
    load_model(out)  # padded q/k/v LoRA and the new shapes load


def test_merge_experts_svd_is_the_best_rank_r_product(random_moe, tmp_path, capsys):
    out = tmp_path / "merged"
    result = merge(capsys, random_moe, out, "--experts", "1,3")
    key = "model.layers.0.mlp.up_proj"
    mean = (_product(random_moe, key, 1) + _product(random_moe, key, 3)) / 2
    U, S, Vh = torch.linalg.svd(mean)
    best = U[:, :8] @ torch.diag(S[:8]) @ Vh[:8]
    torch.testing.assert_close(_product(out, key, 1), best, atol=1e-5, rtol=1e-4)
    kept = float((S[:8] ** 2).sum() / (S ** 2).sum())
    assert result["energy_kept"]["per_module"][key] == pytest.approx(kept, rel=1e-4)
    # router: merged row = mean of the two rows, bias = mean + T·log 2 (first-order logsumexp)
    old, new = Checkpoint(random_moe), Checkpoint(out)
    gw, gb = old.get("awaker_routers.gate_weight"), old.get("awaker_routers.gate_bias")
    torch.testing.assert_close(new.get("awaker_routers.gate_weight")[:, 1], (gw[:, 1] + gw[:, 3]) / 2)
    torch.testing.assert_close(new.get("awaker_routers.gate_bias")[:, 1], (gb[:, 1] + gb[:, 3]) / 2 + math.log(2))
    torch.testing.assert_close(new.get("awaker_routers.gate_weight")[:, 2], gw[:, 2])


@torch.no_grad()
def test_merged_expert_takes_every_record_that_used_either(source, random_moe, tiny_records, tmp_path, capsys):
    model, processor, _ = source
    records = read_records(tiny_records)
    before = run_data(model, processor, records).expert_ids[..., 0]
    assert torch.isin(before, torch.tensor([1, 3])).any() and torch.isin(before, torch.tensor([0, 2])).any()
    out = tmp_path / "merged"
    result = merge(capsys, random_moe, out, "--experts", "1,3", "--data", tiny_records)
    after = run_data(load_model(out), processor, records).expert_ids[..., 0]
    was_merged = torch.isin(before, torch.tensor([1, 3]))
    assert (after[was_merged] == 1).all()
    # the others keep their expert (renumbered) unless the merged one took them, as reported
    renumbered = torch.tensor([0, 1, 2, 1])[before]
    moved = ~was_merged & (after != renumbered)
    assert (after[moved] == 1).all()
    assert int(moved.sum()) == result["calibration"]["router_decisions_moved"]


def test_errors(random_moe, tmp_path, capsys):
    out = tmp_path / "out"
    assert "expert 7 does not exist" in error(capsys, random_moe, out, "--expert", 7, "--p", 0.5)
    assert "expert 9 does not exist" in error(capsys, random_moe, out, "--experts", "1,9")
    assert "at least two" in error(capsys, random_moe, out, "--experts", "2")
    assert "needs the probability" in error(capsys, random_moe, out, "--expert", 1)
    assert "between 0 and 1" in error(capsys, random_moe, out, "--expert", 1, "--p", 1.5)
    assert "--full only applies to --experts" in error(capsys, random_moe, out, "--full")
    assert "is the input" in error(capsys, random_moe, random_moe, "--force")
    quantized = tmp_path / "quantized"
    shutil.copytree(random_moe, quantized)
    config = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"load_in_4bit": True}}))
    assert "quantized export" in error(capsys, quantized, out)
    assert not out.exists()


def test_dry_run_writes_nothing(random_moe, tmp_path, capsys):
    out = tmp_path / "out"
    result = merge(capsys, random_moe, out, "--experts", "0,1,2", "--dry-run")
    assert result["awaker_config"]["num_experts"] == 2 and not out.exists()
    assert merge(capsys, random_moe, out, "--expert", 0, "--p", 0.5, "--dry-run")["mode"] == "bake"
    assert not out.exists()
