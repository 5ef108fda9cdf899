"""Training you can watch: an eval split evaluated on the loss the run trains, early stopping that keeps
the best weights, loss.png / routing.png next to metrics.jsonl, TensorBoard scalars, `awaker stats --plot`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from awaker_cli.cli import run
from awaker_cli.errors import AwakerError
from awaker_cli.plots import LOSS_SIZE, ROUTING_SIZE
from awaker_cli.train import load_recipe
from awaker_cli.train.loop import train
from awaker_cli.train.synthetic import write_synthetic_dataset

from .conftest import model_tensors

FAST = ["train.progress=false", "train.logging_steps=1", "train.warmup_steps=1", "train.scheduler=constant",
        "train.batch_size=4", "train.grad_accum=1", "train.lr=1e-2", "adapter.dropout=0"]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check_png(path, size):
    """A real PNG of the expected size with a picture on it (many colours, not one flat fill)."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size
        pixels = np.asarray(im.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    assert (pixels < 128).mean() > 0.01  # text and lines, not a white page


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("data"), n=8, text_only_every=4)


@pytest.fixture(scope="module")
def stage1(tiny_base, data, tmp_path_factory):
    """Stage I with 2 of 8 records held out, evaluated every 2 steps, reported to TensorBoard."""
    out = tmp_path_factory.mktemp("s1") / "out"
    summary = train(load_recipe("tiny-stage1", [f"model={tiny_base}", f"data.train={data}", f"output_dir={out}",
                                                "train.epochs=6", "data.val_size=0.25", "train.eval_steps=2",
                                                "train.report_to=tensorboard", *FAST]), quiet=True)
    return out, summary


def test_eval_every_eval_steps_and_at_the_end(stage1):
    out, summary = stage1
    rows = metrics(out)
    evals = [r for r in rows if "eval_loss" in r]
    train_rows = [r for r in rows if "loss" in r]
    # 6 records left for training at batch 4: 1 step per epoch, 6 steps; eval at 2, 4, 6
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all(r["eval_records"] == 2 for r in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # the held-out answers are learnt too
    state = json.loads((out / "train_state.json").read_text())
    best = min(evals, key=lambda r: r["eval_loss"])
    assert state["best_eval"]["step"] == best["step"] and state["stopped_early"] is False
    assert summary["best_eval"]["eval_loss"] == pytest.approx(best["eval_loss"])


def test_loss_plot_next_to_metrics_stage1_has_no_routing_plot(stage1):
    out, _ = stage1
    check_png(out / "loss.png", LOSS_SIZE)
    assert not (out / "routing.png").exists()  # stage I has no routers
    assert json.loads((out / "train_state.json").read_text())["plots"] == ["loss.png"]


def test_tensorboard_event_file_holds_the_metrics(stage1):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = stage1
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/loss"} <= set(tags)
    rows = metrics(out)
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows if "loss" in r]
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 4, 6]


def test_eval_loss_is_the_loss_the_run_trains(stage1, data, tmp_path):
    """With the train file as the eval file, one batch of everything, no dropout or router noise, the
    eval at step k sees the weights the train step k+1 computes its loss (and balance loss) with."""
    out = tmp_path / "s2"
    train(load_recipe("tiny-stage2", [f"init_from={stage1[0]}", f"data.train={data}", f"data.val={data}",
                                      f"output_dir={out}", "train.epochs=3", "train.eval_steps=1",
                                      "adapter.router_noise_std=0", "data.shuffle=false", *FAST,
                                      "train.batch_size=8"]), quiet=True)
    rows = metrics(out)
    train_at = {r["step"]: r for r in rows if "loss" in r}
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2, 3]
    for ev in evals[:-1]:
        nxt = train_at[ev["step"] + 1]
        assert ev["eval_loss"] == pytest.approx(nxt["loss"], rel=1e-5, abs=1e-6)
        assert ev["eval_balance_loss"] == pytest.approx(nxt["balance_loss"], rel=1e-5, abs=1e-6)
    # stage II: the routing picture too
    check_png(out / "routing.png", ROUTING_SIZE)
    check_png(out / "loss.png", LOSS_SIZE)


@pytest.mark.parametrize("lr, patience", [
    # warmed up to 3.0 the lr overshoots after the first step: step 2's eval loss is worse than step 1's
    ("3.0", 1),
    # at 1e-12 the updates are far below fp32 resolution: the same eval loss each time, never better
    ("1e-12", 2),
])
def test_early_stopping_stops_and_keeps_the_best(tiny_base, data, tmp_path, lr, patience):
    out = tmp_path / "early"
    argv = [f"model={tiny_base}", f"data.train={data}", f"data.val={data}", f"output_dir={out}",
            "train.epochs=10", "train.eval_steps=1", f"train.early_stopping_patience={patience}",
            "train.keep_checkpoints=true", "train.save_steps=1", "train.save_total_limit=20", *FAST, f"train.lr={lr}",
            "train.warmup_steps=8", "train.batch_size=8"]
    summary = train(load_recipe("tiny-stage1", argv), quiet=True)
    stop = 1 + patience
    evals = [r for r in metrics(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == list(range(1, stop + 1))
    assert all(r["eval_loss"] >= evals[0]["eval_loss"] for r in evals[1:])
    assert [r["best"] for r in evals] == [True] + [False] * patience
    state = json.loads((out / "train_state.json").read_text())
    assert state["step"] == stop and state["total_steps"] == 10 and state["stopped_early"] is True
    assert summary["stopped_early"] and summary["best_eval"]["step"] == 1
    assert max(r["step"] for r in metrics(out)) == stop  # no step trained after the stop
    final = model_tensors(out)
    best = load_file(str(out / "best" / "adapters.safetensors"))
    assert json.loads((out / "best" / "best.json").read_text())["step"] == 1
    for key, value in best.items():
        assert torch.equal(final[key].to(value.dtype), value), key
    first = torch.load(out / "checkpoints" / "step-00000001" / "state.pt", weights_only=True)["adapters"]
    last = torch.load(out / "checkpoints" / f"step-{stop:08d}" / "state.pt", weights_only=True)["adapters"]
    key = "model.layers.0.mlp.up_proj.lora_B"
    assert torch.equal(best[key], first[key]) and not torch.equal(best[key], last[key])
    check_png(out / "loss.png", LOSS_SIZE)
    # the same command again: already trained
    assert train(load_recipe("tiny-stage1", argv), quiet=True)["skipped"]


def test_killed_and_resumed_early_stopping_equals_uninterrupted(tiny_base, data, tmp_path):
    """Killed after step 2 (checkpoint 2, best at step 1): the resumed run carries the best and the count
    of evaluations since it on, stops at the same step and ends with the same weights."""
    def argv(out):
        return [f"model={tiny_base}", f"data.train={data}", f"data.val={data}", f"output_dir={out}", "train.epochs=10",
                "train.eval_steps=1", "train.early_stopping_patience=2", "train.save_steps=2", *FAST,
                "train.lr=1e-12", "train.batch_size=8"]

    full, killed = tmp_path / "full", tmp_path / "killed"
    train(load_recipe("tiny-stage1", argv(full)), quiet=True)

    class Killed(Exception):
        pass

    def kill_after_2(step, _):
        if step == 2:
            raise Killed

    with pytest.raises(Killed):
        train(load_recipe("tiny-stage1", argv(killed)), after_step=kill_after_2, quiet=True)
    assert json.loads((killed / "best" / "best.json").read_text())["step"] == 1
    summary = train(load_recipe("tiny-stage1", argv(killed)), quiet=True)
    assert summary["resumed"] and summary["stopped_early"] and summary["step"] == 3

    def evals(out):
        return [(r["step"], r["eval_loss"], r["best"]) for r in metrics(out) if "eval_loss" in r]

    assert evals(killed) == evals(full) and [s for s, _, _ in evals(full)] == [1, 2, 3]
    a, b = model_tensors(full), model_tensors(killed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not (killed / "best").exists() and not (killed / "checkpoints").exists()


@pytest.mark.parametrize("overrides, message", [
    (["data.val_size=0.5", "data.val=x.jsonl"], "both set"),
    (["train.eval_steps=5"], "needs an eval split"),
    (["data.val_size=0.2", "train.early_stopping_patience=3"], "set train.eval_steps too"),
    (["data.val_size=2.5"], "whole number"),
    (["train.report_to=mlflow"], "must be one of none, tensorboard, wandb"),
])
def test_bad_eval_fields_are_clear(overrides, message):
    with pytest.raises(AwakerError, match=message):
        load_recipe("tiny-stage1", overrides)


def test_val_size_must_leave_records(tiny_base, data, tmp_path):
    with pytest.raises(AwakerError, match="holds out 8 of 8"):
        train(load_recipe("tiny-stage1", [f"model={tiny_base}", f"data.train={data}", f"output_dir={tmp_path / 'o'}",
                                          "data.val_size=8", *FAST]), quiet=True)


def test_stats_plot_draws_the_routing_heatmap(random_moe, data, tmp_path, capsys):
    png = tmp_path / "routing.png"
    assert run(["stats", str(random_moe), "--data", str(data), "--plot", str(png), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["plot"] == str(png)
    check_png(png, ROUTING_SIZE)
    # refuses to overwrite without --force, and never writes over an input
    assert run(["stats", str(random_moe), "--data", str(data), "--plot", str(png)]) == 2
    assert run(["stats", str(random_moe), "--data", str(data), "--plot", str(data)]) == 2
    assert run(["stats", str(random_moe), "--data", str(data), "--plot", str(png), "--force"]) == 0


def test_report_to_a_missing_library_is_one_line_before_loading(tiny_base, data, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    out = tmp_path / "o"
    assert run(["train", "--recipe", "tiny-stage1", f"model={tiny_base}", f"data.train={data}", f"output_dir={out}",
                "train.report_to=wandb", "train.progress=false"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "the wandb package is not installed" in err[0] and "awaker[wandb]" in err[0], err
    assert not out.exists()
