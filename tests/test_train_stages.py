"""The three stages on the tiny model (CPU): loss goes down in each, stage II starts exactly where
stage I ended, stage III leaves the gates bit-identical, a killed run resumes to the same weights."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoProcessor

from awaker_cli.cli import run
from awaker_cli.errors import AwakerError
from awaker_cli.model import AwakerConfig, load_model
from awaker_cli.model.config import LINEARS
from awaker_cli.train import load_recipe
from awaker_cli.train.loop import train
from awaker_cli.train.stages import build_stage_model, plan_stage, trainable_parameters
from awaker_cli.train.synthetic import write_synthetic_dataset

from .conftest import chat_inputs, model_tensors, solid

FAST = ["train.progress=false", "train.logging_steps=1", "train.warmup_steps=1", "train.scheduler=constant"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("data"), n=4, text_only_every=4)


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def tensors(out):
    return model_tensors(out)


def went_down(values):
    return sum(values[-2:]) / 2 < sum(values[:2]) / 2 - 0.15


@pytest.fixture(scope="module")
def stage1(tiny_base, data, tmp_path_factory):
    """Trained through the CLI with the shipped tiny recipe: 6 full-batch steps."""
    out = tmp_path_factory.mktemp("s1") / "out"
    argv = ["train", "--recipe", "tiny-stage1", f"model={tiny_base}", f"data.train={data}", f"output_dir={out}",
            "train.batch_size=4", "train.grad_accum=1", "train.epochs=6", "train.lr=1e-2", *FAST]
    assert run(argv) == 0
    return out


@pytest.fixture(scope="module")
def stage2(stage1, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("s2") / "out"
    train(load_recipe("tiny-stage2", [f"init_from={stage1}", f"data.train={data}", f"output_dir={out}",
                                      "train.batch_size=4", "train.grad_accum=1", "train.epochs=6", "train.lr=1e-2",
                                      "train.gradient_checkpointing=true", "train.balance_loss_coef=0.01", *FAST]),
          quiet=True)
    return out


@pytest.fixture(scope="module")
def stage3(stage2, tmp_path_factory):
    """Instruction tuning on a new task (count the shapes), as stage III does."""
    root = tmp_path_factory.mktemp("s3")
    data = write_synthetic_dataset(root / "data", n=4, question="how many shapes are there ?", answer="one")
    out = root / "out"
    train(load_recipe("tiny-stage3", [f"init_from={stage2}", f"data.train={data}", f"output_dir={out}",
                                      "train.batch_size=4", "train.grad_accum=1", "train.epochs=5", "train.lr=1e-2",
                                      *FAST]), quiet=True)
    return out


def test_stage1_plain_lora_on_all_targets_base_frozen(stage1, tiny_base):
    assert went_down(losses(stage1)), losses(stage1)
    cfg = AwakerConfig.load(stage1)
    assert cfg.lora_targets == list(LINEARS) and cfg.moe_targets == [] and cfg.num_routers == 0
    saved, base = tensors(stage1), load_file(str(tiny_base / "model.safetensors"))
    for key, value in base.items():  # the base (vision tower included) is untouched
        assert torch.equal(saved[key], value), key
    assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in saved.items())
    assert yaml.safe_load((stage1 / "recipe.yaml").read_text())["model"] == str(tiny_base)
    assert json.loads((stage1 / "train_state.json").read_text())["done"]
    assert not (stage1 / "checkpoints").exists()
    load_model(stage1)  # a normal awaker directory


@torch.no_grad()
def test_stage2_starts_exactly_where_stage1_ended(stage1, data, tmp_path):
    processor = AutoProcessor.from_pretrained(stage1)
    prompts = ["what colour is the shape ?", "describe the image ."]
    batch = chat_inputs(processor, prompts, [solid((200, 30, 30)), solid((20, 40, 200), (56, 112))])
    text = chat_inputs(processor, prompts)
    before = load_model(stage1)
    recipe = load_recipe("tiny-stage2", [f"init_from={stage1}", f"data.train={data}", f"output_dir={tmp_path}"])
    after = build_stage_model(plan_stage(recipe), dtype=torch.float32, device=torch.device("cpu"), seed=0).eval()
    assert after.awaker_config.combine == "convex" and after.awaker_config.num_routers > 0
    for inputs in (batch, text):
        expected = before(**inputs).logits
        torch.testing.assert_close(after(**inputs).logits, expected, atol=2e-5, rtol=1e-5)
        assert after.awaker_state.current.expert_ids.unique().numel() >= 1  # routed, and it made no difference
    # every expert slot and the global expert hold the stage-1 LoRA of that linear
    layer = after.model.language_model.layers[0]
    old = before.model.language_model.layers[0]
    for slot in range(after.awaker_config.num_slots):
        assert torch.equal(layer.mlp.down_proj.lora_B[slot], old.mlp.down_proj.lora_B)
        assert torch.equal(layer.self_attn.o_proj.lora_A[slot], old.self_attn.o_proj.lora_A)
    assert torch.equal(layer.self_attn.q_proj.lora_A, old.self_attn.q_proj.lora_A)
    # the release's p² mix cannot start there (p² + 1 - p != 1)
    release = load_recipe("tiny-stage2", [f"init_from={stage1}", f"data.train={data}", f"output_dir={tmp_path}",
                                          "adapter.combine=release"])
    rel = build_stage_model(plan_stage(release), dtype=torch.float32, device=torch.device("cpu"), seed=0).eval()
    assert not torch.allclose(rel(**batch).logits, before(**batch).logits, atol=1e-4)


def test_stage2_trains_experts_and_routers(stage2, stage1, data, tmp_path):
    values = losses(stage2)
    assert went_down(values), values
    assert all("balance_loss" in json.loads(line) for line in (stage2 / "metrics.jsonl").read_text().splitlines())
    saved = tensors(stage2)
    recipe = load_recipe("tiny-stage2", [f"init_from={stage1}", f"data.train={data}", f"output_dir={tmp_path}"])
    fresh = build_stage_model(plan_stage(recipe), dtype=torch.float32, device=torch.device("cpu"), seed=0)
    names = {n for n, _ in trainable_parameters(fresh)}
    assert {"awaker_routers.gate_weight", "awaker_routers.gate_bias", "awaker_routers.norm_weight"} <= names
    assert all("lora_" in n or n.startswith("awaker_routers.") for n in names)
    assert not torch.equal(saved["awaker_routers.gate_weight"], fresh.awaker_routers.gate_weight.detach())
    B = saved["model.layers.0.mlp.gate_proj.lora_B"]
    assert not all(torch.equal(B[0], B[i]) for i in range(1, B.shape[0]))  # the experts moved apart


def test_stage3_gates_frozen_bit_identical(stage3, stage2):
    assert went_down(losses(stage3)), losses(stage3)
    before, after = tensors(stage2), tensors(stage3)
    routers = [k for k in before if k.startswith("awaker_routers.")]
    assert len(routers) == 3
    for key in routers:
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["model.layers.1.mlp.up_proj.lora_B"], after["model.layers.1.mlp.up_proj.lora_B"])
    assert not torch.equal(before["model.layers.1.self_attn.k_proj.lora_B"],
                           after["model.layers.1.self_attn.k_proj.lora_B"])
    model = load_model(stage3)
    assert model.awaker_config.moe_targets and model.awaker_config.num_routers == 4


def test_killed_and_resumed_equals_uninterrupted(stage1, data, tmp_path):
    """Stage 2 with dropout, router noise, shuffling and gradient checkpointing: a run killed after
    step 3 (its last checkpoint is step 2) and re-run with the same command ends bit-identical, also
    when the re-run encodes its batches in 2 loader worker processes."""
    def argv(out):
        return ["train", "--recipe", "tiny-stage2", f"init_from={stage1}", f"data.train={data}", f"output_dir={out}",
                "train.batch_size=2", "train.grad_accum=1", "train.epochs=3", "train.save_steps=2",
                "train.gradient_checkpointing=true", "train.balance_loss_coef=0.01", "train.progress=false",
                "train.logging_steps=1"]

    full, killed = tmp_path / "full", tmp_path / "killed"
    assert run(argv(full)) == 0

    class Killed(Exception):
        pass

    def kill_after_3(step, metrics):
        if step == 3:
            raise Killed

    recipe = load_recipe("tiny-stage2", argv(killed)[3:])
    with pytest.raises(Killed):
        train(recipe, after_step=kill_after_3, quiet=True)
    assert [p.name for p in (killed / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-00000002"]
    assert not (killed / "model.safetensors").exists() and not (killed / "awaker_adapters.safetensors").exists()
    state = torch.load(killed / "checkpoints" / "step-00000002" / "state.pt", weights_only=True)
    assert {"adapters", "optimizer", "scheduler", "rng", "data"} <= set(state) and state["data"]["step"] == 2
    # the same command resumes from step 2; loader workers (a run-control field) encode the same batches
    assert run(argv(killed) + ["data.num_workers=2"]) == 0
    a, b = tensors(full), tensors(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert losses(full) == losses(killed)  # metrics past the checkpoint were recomputed, not duplicated

    # a finished run is not trained again; a changed recipe is refused
    assert train(recipe, quiet=True)["skipped"]
    with pytest.raises(AwakerError, match=r"different recipe \(train.lr changed\)"):
        train(load_recipe("tiny-stage2", argv(killed)[3:] + ["train.lr=0.5"]), quiet=True)


def test_bf16_base_keeps_fp32_adapters(stage1, tiny_base, data, tmp_path):
    recipe = load_recipe("tiny-stage2", [f"init_from={stage1}", f"data.train={data}", f"output_dir={tmp_path}"])
    model = build_stage_model(plan_stage(recipe), dtype=torch.bfloat16, device=torch.device("cpu"), seed=0)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for _, p in trainable_parameters(model))
    # one bf16-autocast step end to end (CPU autocast here, CUDA in real runs). The base computed in bf16
    # but is saved as it is on disk (fp32, bit for bit); the adapters are saved in that dtype too.
    out = tmp_path / "bf16"
    summary = train(load_recipe("tiny-stage1", [f"model={tiny_base}", f"data.train={data}", f"output_dir={out}",
                                                "train.max_steps=1", "train.precision=bf16",
                                                "train.progress=false"]), quiet=True)
    assert summary["final_loss"] == summary["final_loss"]  # not NaN
    saved, base = tensors(out), load_file(str(tiny_base / "model.safetensors"))
    assert all(torch.equal(saved[k], base[k]) for k in base)
    assert {t.dtype for t in saved.values()} == {torch.float32}
    load_model(out)


def test_training_state_estimate_and_gpu_check(stage1, data, tmp_path, monkeypatch):
    """The per-process estimate (weights + gradients + AdamW moments) and the early stop when it alone
    would fill the GPU (the CUDA query is faked: no GPU here)."""
    from awaker_cli.train import parallel

    recipe = load_recipe("tiny-stage2", [f"init_from={stage1}", f"data.train={data}", f"output_dir={tmp_path}"])
    model = build_stage_model(plan_stage(recipe), dtype=torch.float32, device=torch.device("cpu"), seed=0)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for _, p in trainable_parameters(model))
    need = parallel.state_bytes(model, 1, sharded=False, fused=False)
    # fp32: a trainable parameter has a gradient, two moments and (foreach AdamW) a temporary
    assert need == 4 * frozen + 5 * 4 * trainable
    assert parallel.state_bytes(model, 1, sharded=False, fused=True) == 4 * frozen + 4 * 4 * trainable
    assert parallel.state_bytes(model, 2, sharded=True, fused=False) == need // 2
    assert parallel.fused_adamw(torch.device("cuda", 0), sharded=False)
    assert not parallel.fused_adamw(torch.device("cuda", 0), sharded=True)
    assert not parallel.fused_adamw(torch.device("cpu"), sharded=False)  # CPU runs stay bit-reproducible

    class Props:
        total_memory = int(need / 0.95)

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    with pytest.raises(AwakerError, match=r"about .* GB per GPU .*train.parallel=fsdp"):
        parallel.check_fits(need, torch.device("cuda", 0), sharded=False)
    Props.total_memory = 2 * need
    parallel.check_fits(need, torch.device("cuda", 0), sharded=False)
    parallel.check_fits(100 * need, torch.device("cpu"), sharded=False)  # CPU memory is not checked


def test_init_from_must_match_the_stage(stage1, stage2, data, tmp_path):
    with pytest.raises(AwakerError, match="stage 3 starts from a stage-2 output"):
        plan_stage(load_recipe("tiny-stage3", [f"init_from={stage1}", f"data.train={data}"]))
    with pytest.raises(AwakerError, match="already a LoRA-MoE model"):
        plan_stage(load_recipe("tiny-stage2", [f"init_from={stage2}", f"data.train={data}"]))
    with pytest.raises(AwakerError, match="adapter.rank is 16 but the stage-1 model"):
        plan_stage(load_recipe("tiny-stage2", [f"init_from={stage1}", "adapter.rank=16"]))
    with pytest.raises(AwakerError, match="adapter.num_experts is 2 but"):
        plan_stage(load_recipe("tiny-stage3", [f"init_from={stage2}", "adapter.num_experts=2"]))
    with pytest.raises(AwakerError, match="already an awaker model"):
        plan_stage(load_recipe("tiny-stage1", [f"model={stage1}"]))


def test_train_bench_smoke_runs(capsys):
    """bench/train.py (the GPU benchmark of a stage-2 step) runs its harness on the tiny model."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).parents[1] / "bench" / "train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--smoke", "--steps", "2", "--balance", "0.01"])
    assert result["trainable_parameters"] > 0 and result["tokens_per_s"] > 0
    first, last = result["loss_first_last"]
    assert last < first  # three AdamW steps on one batch lower its loss
