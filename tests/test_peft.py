"""peft in and out, checked with peft itself on the tiny base with random non-zero B: an exported stage-I
LoRA loads in PeftModel with awaker's logits, a peft LoRA imports as a stage-I model with peft's logits
(and stage II trains from it), and a folded stage-I model is a plain dense model for transformers."""
from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

from awaker_cli.cli import run
from awaker_cli.model import AwakerConfig, load_model, save_model
from awaker_cli.model.build import attach_adapters, load_base
from awaker_cli.model.config import LINEARS

from .conftest import chat_inputs, randomize_adapters, solid

PROMPTS = ["what colour is the shape ?", "describe the image ."]


@pytest.fixture(scope="module")
def batch(tiny_base):
    processor = AutoProcessor.from_pretrained(tiny_base)
    return chat_inputs(processor, PROMPTS, [solid((200, 30, 30)), solid((20, 40, 200), (56, 112))])


@pytest.fixture(scope="module")
def stage1(tiny_base, tmp_path_factory):
    """A stage-I awaker model (plain LoRA on all seven linears, as `train` stage 1 builds it) with random B."""
    from awaker_cli.train import load_recipe
    from awaker_cli.train.stages import plan_stage

    out = tmp_path_factory.mktemp("stage1") / "model"
    recipe = load_recipe("tiny-stage1", [f"model={tiny_base}", f"output_dir={out}", "adapter.rank=4",
                                         "adapter.alpha=12"])
    model, _ = load_base(tiny_base)
    attach_adapters(model, plan_stage(recipe).config, adapter_dtype=torch.float32)
    randomize_adapters(model, seed=3, scale=0.3)
    save_model(model, out, tiny_base)
    return out


def call(capsys, *args) -> dict:
    capsys.readouterr()
    assert run([*map(str, args), "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def error(capsys, *args) -> str:
    capsys.readouterr()
    assert run(list(map(str, args))) == 2
    return capsys.readouterr().err


@torch.no_grad()
def test_export_peft_loads_in_peft_with_awaker_logits(stage1, tiny_base, batch, tmp_path, capsys):
    out = tmp_path / "adapter"
    r = call(capsys, "export-peft", stage1, out)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 12 and config["peft_type"] == "LORA"
    assert config["target_modules"] == list(LINEARS) and config["base_model_name_or_path"] == str(tiny_base)
    assert r["modules"] == 2 * 7
    peft_model = PeftModel.from_pretrained(Qwen2VLForConditionalGeneration.from_pretrained(tiny_base), out).eval()
    # every LoRA peft made holds the exported tensors (none left at its zero init), and nothing more
    loras = {n: m for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert len(loras) == 2 * 7 and not any("visual" in n for n in loras)
    ours = load_model(stage1).eval()
    expected = ours(**batch).logits
    got = peft_model(**batch).logits
    assert (expected - Qwen2VLForConditionalGeneration.from_pretrained(tiny_base)(**batch).logits).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert "is the input" in error(capsys, "export-peft", stage1, stage1, "--force")


def test_export_peft_refuses_routed_experts(random_moe, tiny_base, tmp_path, capsys):
    out = tmp_path / "adapter"
    message = error(capsys, "export-peft", random_moe, out)
    assert "routed LoRA experts on o_proj" in message and "Traceback" not in message and not out.exists()
    assert "not an awaker model" in error(capsys, "export-peft", tiny_base, out)


def peft_adapter(tiny_base, out, seed=1, **lora):
    """A peft LoRA made by peft itself on the tiny base, B random and non-zero, saved with save_pretrained."""
    torch.manual_seed(seed)
    model = get_peft_model(Qwen2VLForConditionalGeneration.from_pretrained(tiny_base), LoraConfig(**lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    model.save_pretrained(out)
    return model.eval()


@torch.no_grad()
@pytest.mark.parametrize("variant", ["all-linears", "rslora-one-layer"])
def test_import_peft_equals_peft(variant, tiny_base, batch, tmp_path, capsys):
    lora = dict(r=4, lora_alpha=8, target_modules=list(LINEARS))
    if variant == "rslora-one-layer":
        lora.update(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                    layers_to_transform=[1])
    model = peft_adapter(tiny_base, tmp_path / "adapter", **lora)
    out = tmp_path / "stage1"
    r = call(capsys, "import-peft", tmp_path / "adapter", out, "--base", tiny_base)
    cfg = AwakerConfig.load(out)
    assert cfg.lora_targets == [t for t in LINEARS if t in lora["target_modules"]] and not cfg.moe_targets
    assert cfg.rank == lora["r"] and r["modules_filled"] == (3 if variant == "rslora-one-layer" else 0)
    ours = load_model(out).eval()
    torch.testing.assert_close(ours(**batch).logits, model(**batch).logits, atol=1e-5, rtol=1e-5)
    # and back out: the same peft adapter tensors (a left-out layer comes back with B = 0)
    if variant == "all-linears":
        back = tmp_path / "back"
        call(capsys, "export-peft", out, back)
        from safetensors.torch import load_file

        a, b = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")), load_file(
            str(back / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stage2_starts_from_an_imported_peft_lora(tiny_base, batch, tmp_path, capsys):
    from awaker_cli.train import load_recipe
    from awaker_cli.train.stages import build_stage_model, plan_stage
    from awaker_cli.train.synthetic import write_synthetic_dataset

    peft_model = peft_adapter(tiny_base, tmp_path / "adapter", seed=2, r=4, lora_alpha=8,
                              target_modules=list(LINEARS))
    stage1 = tmp_path / "stage1"
    call(capsys, "import-peft", tmp_path / "adapter", stage1, "--base", tiny_base)
    data = write_synthetic_dataset(tmp_path / "data", n=4, text_only_every=4)
    out = tmp_path / "stage2"
    overrides = [f"init_from={stage1}", f"data.train={data}", f"output_dir={out}", "train.batch_size=4",
                 "train.grad_accum=1", "train.epochs=2", "train.progress=false", "train.logging_steps=1",
                 "train.warmup_steps=1", "train.scheduler=constant"]
    with torch.no_grad():  # convex combine: stage II starts exactly at the peft model
        start = build_stage_model(plan_stage(load_recipe("tiny-stage2", overrides)), dtype=torch.float32,
                                  device=torch.device("cpu"), seed=0).eval()
        torch.testing.assert_close(start(**batch).logits, peft_model(**batch).logits, atol=2e-5, rtol=1e-5)
    assert run(["train", "tiny-stage2", *overrides]) == 0
    cfg = AwakerConfig.load(out)
    assert cfg.moe_targets and cfg.num_experts == 4
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_import_peft_errors(tiny_base, random_moe, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    peft_adapter(tiny_base, adapter, r=2, lora_alpha=4, target_modules=["q_proj"])
    out = tmp_path / "out"
    assert "no adapter_config.json" in error(capsys, "import-peft", tmp_path, out, "--base", tiny_base)
    assert "an awaker model" in error(capsys, "import-peft", adapter, out, "--base", random_moe)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    assert "DoRA" in error(capsys, "import-peft", adapter, out, "--base", tiny_base)
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    assert "ranks [2] (r 3)" in error(capsys, "import-peft", adapter, out, "--base", tiny_base)
    assert not out.exists()


@torch.no_grad()
def test_folded_stage1_is_a_plain_dense_model(stage1, batch, tmp_path, capsys):
    out = tmp_path / "dense"
    r = call(capsys, "merge", stage1, out)
    assert r["mode"] == "fold-lora-dense" and r["folded_modules"] == 2 * 7
    assert not (out / "awaker_config.json").exists()
    dense, info = Qwen2VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    torch.testing.assert_close(dense.eval()(**batch).logits, load_model(stage1).eval()(**batch).logits,
                               atol=2e-5, rtol=1e-5)
    assert "lora" not in (out / "README.md").read_text().split("---")[1]  # card metadata: no LoRA tags


@torch.no_grad()
def test_import_peft_reads_hub_key_names(tiny_base, batch, tmp_path, capsys):
    """Adapters saved against transformers 4 name modules by their hub path (model.layers.N…): same import."""
    from safetensors.torch import load_file, save_file

    model = peft_adapter(tiny_base, tmp_path / "adapter", seed=4, r=2, lora_alpha=4,
                         target_modules=["q_proj", "up_proj"])
    file = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(file))
    save_file({k.replace("model.language_model.", "model."): v for k, v in tensors.items()}, str(file))
    assert not any("language_model" in k for k in load_file(str(file)))
    call(capsys, "import-peft", tmp_path / "adapter", tmp_path / "stage1", "--base", tiny_base)
    torch.testing.assert_close(load_model(tmp_path / "stage1").eval()(**batch).logits, model(**batch).logits,
                               atol=1e-5, rtol=1e-5)
