"""Every command after upcycle on the Qwen2.5-VL and Qwen3-VL tiny models: train stages I-III, merge
(fold, bake into a dense model the family's own transformers class loads), stats, prune, export nf4/int8."""
from __future__ import annotations

import json

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoProcessor

from awaker_cli.checkpoint import Checkpoint
from awaker_cli.cli import run
from awaker_cli.model import AwakerConfig, Routing, load_model
from awaker_cli.model.families import FAMILIES
from awaker_cli.train import load_recipe
from awaker_cli.train.loop import train
from awaker_cli.train.synthetic import write_synthetic_dataset

from .conftest import NEW_FAMILIES, chat_inputs, solid

FAST = ["train.progress=false", "train.logging_steps=1", "train.warmup_steps=1", "train.scheduler=constant",
        "train.batch_size=4", "train.grad_accum=1", "train.lr=1e-2"]
PROMPTS = ["what colour is the shape ?", "read the digit ."]
IMAGES = [solid((200, 30, 30)), solid((20, 200, 40), (56, 112))]


def cli_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert run([*map(str, args), "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def went_down(values):
    return sum(values[-2:]) / 2 < sum(values[:2]) / 2 - 0.15


@pytest.mark.parametrize("fam", NEW_FAMILIES)
def test_train_stages_on_family(fam, family_bases, tmp_path):
    """Stage I (plain LoRA, base frozen), II (experts + routers from stage I), III (gates frozen)."""
    data = write_synthetic_dataset(tmp_path / "data", n=4, text_only_every=4)
    s1, s2, s3 = tmp_path / "s1", tmp_path / "s2", tmp_path / "s3"
    base = family_bases[fam, "hub"]
    train(load_recipe("tiny-stage1", [f"model={base}", f"data.train={data}", f"output_dir={s1}", "train.epochs=6",
                                      *FAST]), quiet=True)
    assert went_down(losses(s1)), losses(s1)
    base_ckpt, trained = Checkpoint(base), Checkpoint(s1)
    for key in base_ckpt.tensors:  # the base, vision tower included, is untouched
        assert torch.equal(trained.get(key), base_ckpt.get(key)), key
    assert AwakerConfig.load(s1).family == fam
    train(load_recipe("tiny-stage2", [f"init_from={s1}", f"data.train={data}", f"output_dir={s2}", "train.epochs=6",
                                      *FAST]), quiet=True)
    assert went_down(losses(s2)), losses(s2)
    count = write_synthetic_dataset(tmp_path / "count", n=4, question="how many shapes are there ?", answer="one")
    train(load_recipe("tiny-stage3", [f"init_from={s2}", f"data.train={count}", f"output_dir={s3}", "train.epochs=5",
                                      *FAST]), quiet=True)
    assert went_down(losses(s3)), losses(s3)
    before, after = Checkpoint(s2), Checkpoint(s3)
    routers = [k for k in before.tensors if k.startswith("awaker_routers.")]
    assert len(routers) == 3 and all(torch.equal(before.get(k), after.get(k)) for k in routers)
    key = "model.layers.1.mlp.up_proj.lora_B"
    assert not torch.equal(before.get(key), after.get(key))
    model = load_model(s3)
    assert type(model).__name__ == FAMILIES[fam].model_class and model.awaker_config.num_routers == 4


def logits_under(model, batch, routing=None):
    model.awaker_state.fixed = None if routing is None else routing.select(torch.zeros(2, dtype=torch.long))
    try:
        return model(**batch).logits
    finally:
        model.awaker_state.fixed = None


@pytest.mark.parametrize("fam", NEW_FAMILIES)
@torch.no_grad()
def test_merge_fold_and_bake_on_family(fam, family_moes, tmp_path, capsys):
    src = family_moes[fam]
    model = load_model(src)
    batch = chat_inputs(AutoProcessor.from_pretrained(src), PROMPTS, IMAGES)
    folded = tmp_path / "folded"
    assert cli_json(capsys, "merge", src, folded)["mode"] == "fold-lora"
    torch.testing.assert_close(load_model(folded)(**batch).logits, logits_under(model, batch), atol=2e-5, rtol=1e-5)
    dense_dir = tmp_path / "dense"
    cli_json(capsys, "merge", src, dense_dir, "--expert", 2, "--p", 0.7)
    assert not (dense_dir / "awaker_config.json").exists()
    dense = FAMILIES[fam].load_class().from_pretrained(dense_dir).eval()  # plain transformers, the family's class
    cfg = model.awaker_config
    routing = Routing.from_probs(torch.full((1, cfg.num_routers, 1), 2), torch.full((1, cfg.num_routers, 1), 0.7),
                                 cfg.combine, True)
    expected = logits_under(model, batch, routing)
    torch.testing.assert_close(dense(**batch).logits, expected, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(expected, logits_under(model, batch), atol=1e-3)


@pytest.mark.parametrize("fam", NEW_FAMILIES)
def test_stats_and_prune_on_family(fam, family_moes, tiny_records, tmp_path, capsys):
    src = family_moes[fam]
    s = cli_json(capsys, "stats", src, "--data", tiny_records)
    assert s["records"] == 12 and len(s["routers"]) == 4
    assert all(sum(r["counts"]) == 12 for r in s["routers"])
    out = tmp_path / "pruned"
    cli_json(capsys, "prune", src, out, "--data", tiny_records, "--keep", 2)
    pruned = load_model(out)
    assert pruned.awaker_config.num_experts == 2 and pruned.awaker_config.family == fam
    batch = chat_inputs(AutoProcessor.from_pretrained(out), PROMPTS, IMAGES)
    with torch.no_grad():
        assert torch.isfinite(pruned(**batch).logits).all()


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
@pytest.mark.parametrize("fam", NEW_FAMILIES)
@torch.no_grad()
def test_4bit_export_loads_and_answers_on_family(fam, quant, family_moes, tmp_path, capsys):
    src = family_moes[fam]
    out = tmp_path / quant
    r = cli_json(capsys, "export", src, out, "--quantize", quant)
    assert r["quantized_modules"] == 2 * 7
    ckpt = Checkpoint(out)
    # only language-model linears are quantized: no vision tensor is packed (Qwen2.5-VL's vision MLPs
    # have gate/up/down_proj of their own)
    vision = [k for k in ckpt.tensors if k.startswith("visual.")]
    assert vision and all(ckpt.tensors[k].dtype == torch.bfloat16 for k in vision if k.endswith(".weight"))
    assert not any(k.startswith("visual.") and ".absmax" in k for k in ckpt.tensors)
    model = load_model(out, dtype=torch.float32)
    assert isinstance(model.model.language_model.layers[1].mlp.gate_proj.base_layer, bnb.nn.Linear4bit)
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.model.visual.modules())
    batch = chat_inputs(AutoProcessor.from_pretrained(out), ["what colour is the shape ?"], [solid((200, 30, 30))])
    steps = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert steps.shape[1] == batch["input_ids"].shape[1] + 3
    plain = FAMILIES[fam].load_class().from_pretrained(out)  # transformers' own bnb loader
    assert isinstance(plain.model.language_model.layers[1].mlp.gate_proj, bnb.nn.Linear4bit)


@pytest.mark.parametrize("fam", NEW_FAMILIES)
@torch.no_grad()
def test_baked_int8_export_loads_in_plain_transformers(fam, family_moes, tmp_path, capsys):
    dense_dir, out = tmp_path / "dense", tmp_path / "int8"
    cli_json(capsys, "merge", family_moes[fam], dense_dir, "--expert", 1, "--p", 0.8)
    r = cli_json(capsys, "export", dense_dir, out, "--quantize", "int8")
    assert r["kind"] == FAMILIES[fam].label.lower()
    plain = FAMILIES[fam].load_class().from_pretrained(out).eval()
    assert isinstance(plain.model.language_model.layers[0].self_attn.o_proj, bnb.nn.Linear8bitLt)
    batch = chat_inputs(AutoProcessor.from_pretrained(out), ["what colour is the shape ?"], [solid((200, 30, 30))])
    reference = FAMILIES[fam].load_class().from_pretrained(dense_dir).eval()
    got, want = plain(**batch).logits.float(), reference(**batch).logits
    assert torch.isfinite(got).all()
    assert (got - want).norm() / want.norm() < 0.1  # int8 and bf16 rounding only (about 5% at tiny widths)


@pytest.mark.parametrize("fam", NEW_FAMILIES)
def test_chat_and_eval_on_family(fam, family_moes, tiny_records, tmp_path, capsys):
    """`awaker chat` answers as the engine does (routes included); `awaker eval` gives the same greedy
    answers batched with mixed routes as one record at a time."""
    from awaker_cli.generate import SamplingParams, load_engine

    src, image = family_moes[fam], tmp_path / "red.png"
    solid((200, 30, 30)).save(image)
    out = cli_json(capsys, "chat", src, "-p", PROMPTS[0], "--image", image, "--max-new-tokens", "4", "--device", "cpu")
    message = {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": PROMPTS[0]}]}
    want = load_engine(str(src)).generate([[message]], SamplingParams(max_new_tokens=4))[0]
    assert out["tokens"] == want.tokens and out["text"] == want.text
    reported = [[e["experts"] for e in g["per_layer"]] for g in out["routing"]["groups"]]
    assert torch.equal(torch.tensor(reported), want.routing.expert_ids[0].view(-1, len(reported), 1).transpose(0, 1))
    rows = {}
    for batch in (1, 4):
        preds = tmp_path / f"p{batch}.jsonl"
        result = cli_json(capsys, "eval", src, "--data", tiny_records, "--max-new-tokens", "3", "--batch-size", batch,
                          "--predictions", preds)
        assert result["kind"] == "awaker" and result["routing"]["histogram"]
        rows[batch] = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [(r["prediction"], r["experts"]) for r in rows[1]] == [(r["prediction"], r["experts"]) for r in rows[4]]
    assert len({tuple(r["experts"]) for r in rows[4]}) > 1  # the batch really mixed routes
