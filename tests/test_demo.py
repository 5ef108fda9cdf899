"""`awaker demo --quick`: the whole pipeline end to end on the shipped tiny model (toy sizes)."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from awaker_cli.cli import run
from awaker_cli.demo import QUICK, STAGES
from awaker_cli.synth import TASKS


def _tensors(model_dir):
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Where the module's demo runs (the first test writes it, the others reuse it)."""
    return tmp_path_factory.mktemp("demo") / "demo-out"


def test_demo_quick_end_to_end(demo, capsys):
    out = demo
    assert run(["demo", str(out), "--quick", "--seed", "3"]) == 0
    err = capsys.readouterr().err

    # data
    train = (out / "data" / "train.jsonl").read_text().splitlines()
    test = (out / "data" / "test.jsonl").read_text().splitlines()
    assert len(train) == QUICK.n_train and len(test) == QUICK.n_test
    assert {json.loads(line)["task"] for line in test} == set(TASKS)

    # the three stages: ordinary `awaker train` outputs, each the architecture its stage promises
    configs = {}
    for stage in ("stage1", "stage2", "stage3"):
        d = out / stage
        assert (d / "recipe.yaml").is_file() and (d / "metrics.jsonl").is_file()
        assert json.loads((d / "train_state.json").read_text())["done"]
        configs[stage] = json.loads((d / "awaker_config.json").read_text())
    assert configs["stage1"]["moe_targets"] == []
    assert configs["stage2"]["num_experts"] == 4 and configs["stage2"]["moe_targets"]
    stage2, stage3 = _tensors(out / "stage2"), _tensors(out / "stage3")
    routers = [k for k in stage2 if k.startswith("awaker_routers.")]
    assert routers and all(stage2[k].equal(stage3[k]) for k in routers)  # stage 3: gates frozen
    experts = [k for k in stage2 if k.endswith("mlp.gate_proj.lora_B")]
    assert experts and not all(stage2[k].equal(stage3[k]) for k in experts)  # ... experts trained

    # eval: both models, every task, predictions written
    summary = json.loads((out / "summary.json").read_text())
    for name in ("dense", "moe"):
        assert set(summary["eval"][name]["tasks"]) == set(TASKS)
        assert len((out / "eval" / f"{name}.jsonl").read_text().splitlines()) == QUICK.n_test
    assert "routing" in summary["eval"]["moe"] and "routing" not in summary["eval"]["dense"]
    for task in TASKS:
        assert task in err  # the table shows every task

    # prune dropped one expert; export wrote nf4 weights
    assert json.loads((out / "pruned" / "awaker_config.json").read_text())["num_experts"] == 3
    assert len(summary["prune"]["removed_experts"]) == 1 and "loss_change" in summary["prune"]
    quant = json.loads((out / "nf4" / "config.json").read_text())["quantization_config"]
    assert quant["load_in_4bit"] and quant["bnb_4bit_quant_type"] == "nf4"
    assert any(k.endswith("quant_state.bitsandbytes__nf4") for k in _tensors(out / "nf4"))

    # the chat answer, printed with its routing
    chat = summary["chat"]
    assert chat["model"].endswith("nf4") and chat["routing"]["groups"]
    assert f"assistant: {chat['answer']}" in err
    assert sum(line.strip().startswith("routing:") for line in err.splitlines()) == len(chat["routing_lines"]) == 2
    assert "o_proj router" in err and "gate_proj router" in err

    # a line and a timing per stage
    assert list(summary["timings"]) == [key for key, _ in STAGES]
    assert summary["wall_s"] > 0


def test_demo_refuses_to_overwrite_without_force(demo, capsys):
    if not (demo / "summary.json").exists():
        pytest.skip("needs the demo run above")
    before = (demo / "summary.json").read_text()
    assert run(["demo", str(demo), "--quick"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (demo / "summary.json").read_text() == before


def test_demo_force_replaces_only_a_demo_output(tmp_path, capsys):
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert run(["demo", str(other), "--quick", "--force"]) == 2
    assert "not an awaker demo output" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep me"


def test_demo_json_replaces_an_earlier_demo(demo, capsys):
    if not (demo / "summary.json").exists():
        pytest.skip("needs the demo run above")
    assert run(["demo", str(demo), "--quick", "--force", "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["seed"] == 0 and summary["quick"] is True  # the new run, not the seed-3 one
    assert set(summary["eval"]["moe"]["tasks"]) == set(TASKS)
    assert "routing:" not in captured.err  # --json: no report, no progress display
    assert json.loads((demo / "summary.json").read_text())["seed"] == 0
