"""The synthetic multi-task data: deterministic bytes, disjoint splits, answers in conflicting formats,
images that show what their answers say."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from awaker_cli.cli import run
from awaker_cli.evaluate import load_samples
from awaker_cli.synth import COLOURS, TASKS, format_ok, make_image, write_dataset
from awaker_cli.synth.images import GRID, SIZE


def _digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".awaker-output"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    write_dataset(out, 48, 24, seed=5)
    return out


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_seed_same_bytes_other_seed_other_bytes(dataset, tmp_path):
    write_dataset(tmp_path / "again", 48, 24, seed=5)
    write_dataset(tmp_path / "other", 48, 24, seed=6)
    first = _digest(dataset)
    assert len(first) == 2 + 48 + 24
    assert _digest(tmp_path / "again") == first
    other = _digest(tmp_path / "other")
    assert other.keys() == first.keys()
    assert sum(other[k] != first[k] for k in first) >= 70  # practically every file differs


def test_train_and_test_images_are_disjoint(dataset):
    hashes = {split: {hashlib.sha256(p.read_bytes()).digest() for p in (dataset / "img" / split).iterdir()}
              for split in ("train", "test")}
    assert len(hashes["train"]) == 48 and len(hashes["test"]) == 24  # no duplicate inside a split either
    assert not hashes["train"] & hashes["test"]


def test_records_are_in_the_training_format_with_balanced_tasks(dataset):
    records = _records(dataset / "train.jsonl")
    assert {r["task"] for r in records} == set(TASKS)
    assert all(sum(r["task"] == t for r in records) == 48 // len(TASKS) for t in TASKS)
    for r in records:
        user, assistant = r["messages"]
        assert user["role"] == "user" and user["content"].startswith("<image>") and user["content"].count("<image>") == 1
        assert assistant["role"] == "assistant"
        assert (dataset / r["images"][0]).is_file()  # relative to the JSONL
    samples = load_samples(dataset / "test.jsonl")  # eval reads it as written
    assert len(samples) == 24 and samples[0].prompt[0]["content"][0] == {"type": "image"}


def test_each_answer_has_its_format_and_not_its_sibling_style(dataset):
    records = _records(dataset / "train.jsonl")
    for r in records:
        answer, task = r["messages"][1]["content"], r["task"]
        assert format_ok(task, answer), (task, answer)
        siblings = [t for t, spec in TASKS.items() if spec.family == TASKS[task].family and t != task]
        assert siblings and not any(format_ok(s, answer) for s in siblings), (task, answer)
        # the style cue is the only difference between the two prompts of a family
        assert r["messages"][0]["content"].endswith(TASKS[task].cue)
    assert format_ok("color-json", '{"color": "RED"}') and not format_ok("color-json", '{"color": "red"}')
    assert format_ok("caption-tags", "red, circle, 2, 7") and not format_ok("caption-tags", "Two red circles.")
    assert format_ok("count-word", "three") and not format_ok("count-word", "3")
    assert format_ok("unknown-task", "anything") is None


def test_images_show_what_the_scene_says():
    for i in range(20):
        image, scene = make_image(f"check/{i}")
        pixels = np.asarray(image, dtype=int)
        assert pixels.shape == (SIZE, SIZE, 3)
        cell = SIZE // GRID
        target = np.array(COLOURS[scene.colour])
        for index in range(GRID * GRID):
            row, col = divmod(index, GRID)
            block = pixels[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell].reshape(-1, 3)
            # every pixel's nearest palette colour: exact shape colours only appear in shape cells
            shape_pixels = (np.abs(block - target).sum(1) == 0).sum()
            assert (shape_pixels > 30) == (index in scene.cells[:-1]), (i, index, scene)
            dark = (block.max(1) < 80).sum()  # the digit's ink
            assert (dark > 15) == (index == scene.cells[-1]), (i, index, scene)
        other = [c for name, c in COLOURS.items() if name != scene.colour]
        assert not any((np.abs(pixels.reshape(-1, 3) - np.array(c)).sum(1) == 0).any() for c in other)
    assert len({make_image(f"check/{i}")[1].colour for i in range(20)}) > 3


def test_synth_command(tmp_path, capsys):
    out = tmp_path / "d"
    assert run(["synth", str(out), "--train", "8", "--test", "4", "--seed", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_train"] == 8 and Path(result["train"]).is_file() and len(_records(Path(result["test"]))) == 4
    assert run(["synth", str(out), "--train", "8", "--test", "4"]) == 2  # exists: needs --force
    assert "already exists" in capsys.readouterr().err
    assert run(["synth", str(tmp_path / "e"), "--tasks", "color-word,nope"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
    assert run(["synth", str(out), "--train", "4", "--test", "4", "--tasks", "ocr-word", "--force"]) == 0
    assert {r["task"] for r in _records(out / "train.jsonl")} == {"ocr-word"}
