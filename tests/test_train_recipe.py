"""Recipes: shipped ones found by name, overrides, --print-config, validation before anything loads."""
from __future__ import annotations

import pytest
import yaml

from awaker_cli.cli import run
from awaker_cli.errors import AwakerError
from awaker_cli.train.recipe import find_recipe, load_recipe, shipped_recipes


def expect_error(capsys, argv, *fragments):
    assert run(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for f in fragments:
        assert f in err, err

SHIPPED = ["stage1", "stage2", "stage3", "tiny-stage1", "tiny-stage2", "tiny-stage3"]


def test_shipped_recipes_load():
    assert set(SHIPPED) <= set(shipped_recipes())
    for name in SHIPPED:
        r = load_recipe(name)
        assert r.stage == int(name[-1])
    s1, s2, s3 = (load_recipe(f"stage{i}") for i in (1, 2, 3))
    # the paper's 7B settings
    assert (s1.adapter.rank, s1.adapter.alpha, s1.adapter.dropout) == (256, 512.0, 0.05)
    assert len(s1.adapter.lora_targets) == 7
    assert (s2.adapter.num_experts, s2.adapter.top_k, s2.adapter.global_expert, s2.adapter.combine) == (4, 1, True,
                                                                                                        "convex")
    for r in (s1, s2, s3):
        assert r.train.precision == "bf16" and r.train.gradient_checkpointing and r.train.scheduler == "cosine"
        assert r.train.lr == pytest.approx(1e-4) and r.train.warmup_ratio > 0
    assert s2.init_from == s1.output_dir and s3.init_from == s2.output_dir


def test_overrides_and_print_config(capsys):
    assert run(["train", "--recipe", "stage2", "--print-config", "train.lr=2e-4", "init_from=/x/s1",
                "data.train=a.jsonl", "adapter.num_experts=8", "train.gradient_checkpointing=false"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["lr"] == pytest.approx(2e-4)
    assert shown["init_from"] == "/x/s1" and shown["data"]["train"] == ["a.jsonl"]
    assert shown["adapter"]["num_experts"] == 8 and shown["train"]["gradient_checkpointing"] is False
    assert shown["train"]["save_steps"] == 500  # defaults are filled in


def test_recipe_as_first_argument(tmp_path, capsys):
    """`awaker train cfg.yaml key=value`, as LLaMA-Factory users type it, reads the same as --recipe."""
    path = tmp_path / "mine.yaml"
    path.write_text("stage: 1\nmodel: base\noutput_dir: s1\n")
    assert run(["train", str(path), "train.lr=3e-4", "--print-config"]) == 0
    positional = yaml.safe_load(capsys.readouterr().out)
    assert run(["train", "--recipe", str(path), "train.lr=3e-4", "--print-config"]) == 0
    assert positional == yaml.safe_load(capsys.readouterr().out)
    assert positional["train"]["lr"] == pytest.approx(3e-4) and positional["model"] == "base"
    assert run(["train", "stage2", "--print-config"]) == 0 and "stage: 2" in capsys.readouterr().out
    expect_error(capsys, ["train", "stage1", "--recipe", "stage2"], "the recipe is given twice")
    expect_error(capsys, ["train", "train.lr=1"], "which recipe?")
    expect_error(capsys, ["train"], "which recipe?")


def test_recipe_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("stage: 3\ninit_from: s2\noutput_dir: s3\ntrain:\n  lr: 1e-5\n")
    r = load_recipe(str(path))
    assert r.stage == 3 and r.train.lr == pytest.approx(1e-5)  # YAML's "1e-5" string becomes a number
    assert find_recipe(str(path)) == path


@pytest.mark.parametrize("argv,fragments", [
    (["train.lrr=1"], ["unknown field train.lrr", "allowed in train:", "lr,", "grad_accum"]),
    (["foo=1"], ["unknown field foo", "allowed at the top level: stage, model, init_from"]),
    (["train.lr=fast"], ["train.lr must be a number, got 'fast'"]),
    (["train.epochs=1.5"], ["train.epochs must be an integer"]),
    (["train.gradient_checkpointing=maybe"], ["train.gradient_checkpointing must be true or false"]),
    (["adapter.combine=sum"], ["adapter.combine must be one of release, convex"]),
    (["stage=4"], ["stage must be one of 1, 2, 3"]),
    (["train.batch_size=0"], ["train.batch_size must be at least 1"]),
    (["stage=1", "init_from=null", "model=m"], ["adapter.moe_targets has no meaning in stage 1"]),
    (["stage=1", "model=m"], ["stage 1 starts from a dense base"]),
    (["model=m"], ["stage 2 starts from the previous stage's output"]),
    (["train.balance_loss_coef=0.1", "stage=3"], ["balance_loss_coef must be 0 in stage 3"]),
    (["lr"], ["write it as key=value"]),
])
def test_bad_recipes_are_one_line_errors(capsys, argv, fragments):
    expect_error(capsys, ["train", "--recipe", "stage2", "--print-config", *argv], *fragments)


def test_unknown_key_in_file(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("stage: 1\nmodel: m\ndata:\n  trian: [x.jsonl]\n")
    expect_error(capsys, ["train", "--recipe", str(path), "--print-config"], "unknown field data.trian",
                 "allowed in data: train, format")
    expect_error(capsys, ["train", "--recipe", "no-such-recipe"], "no recipe 'no-such-recipe'", "tiny-stage1")


def test_checked_before_any_weights_load(tmp_path, capsys, monkeypatch, tiny_base):
    """Missing files, a bad record, a wrong init_from stop before a model is built."""
    import awaker_cli.train.stages as stages

    monkeypatch.setattr(stages, "load_base", lambda *a, **k: pytest.fail("weights loaded"))
    out = str(tmp_path / "out")
    expect_error(capsys, ["train", "--recipe", "tiny-stage1", f"model={tmp_path}", f"output_dir={out}",
                          "data.train=nope.jsonl"], "data.train: nope.jsonl: no such file")
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "x"}],'
                    ' "images": ["gone.png"]}\n')
    expect_error(capsys, ["train", "--recipe", "tiny-stage1", f"model={tiny_base}", f"output_dir={out}",
                          f"data.train={data}"], f"{data}:1: missing image gone.png")
    expect_error(capsys, ["train", "--recipe", "tiny-stage2", f"init_from={tiny_base}", f"output_dir={out}",
                          f"data.train={data}"], "not an awaker model")
    with pytest.raises(AwakerError, match="stage 1 needs `model`"):
        from awaker_cli.train.loop import train

        train(load_recipe("tiny-stage1", ["model=null", f"output_dir={out}"]))


def test_wheel_ships_the_recipes_and_the_tiny_base(tmp_path):
    """A plain (non-editable) install must carry the recipes and the tiny base as package data: build the
    wheel (offline, with the locked setuptools) and look inside it."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "-w", str(tmp_path), str(root)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("awaker-*.whl"))).namelist()
    for name in SHIPPED:
        assert f"awaker_cli/recipes/{name}.yaml" in names
    assert "awaker_cli/assets/tiny-base/model.safetensors" in names
    assert not [n for n in names if n.startswith(("tests/", "bench/"))]
