"""The tiny pretrained Qwen2-VL shipped in the package: small, complete, and it really sees."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoProcessor

from awaker_cli.checkpoint import missing_processor_files
from awaker_cli.cli import run
from awaker_cli.evaluate import generate_answers, prepare
from awaker_cli.model import load_base
from awaker_cli.synth import NUMBER_WORDS, format_ok, make_image, tiny_base_path
from awaker_cli.synth.pretrain import pretrain


@pytest.fixture(scope="module")
def shipped():
    model, _ = load_base(tiny_base_path(), dtype=torch.float32)
    return model, AutoProcessor.from_pretrained(tiny_base_path())


def _ask(model, processor, question, images):
    prompts = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]] * len(images)
    return generate_answers(model, processor, prepare(processor, prompts, [[im] for im in images]), 24)


def test_shipped_directory_is_small_and_complete():
    path = tiny_base_path()
    weights = sorted(path.glob("*.safetensors"))
    assert weights and sum(w.stat().st_size for w in weights) <= 8 * 1024**2
    assert missing_processor_files(path) == []
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl" and config["architectures"] == ["Qwen2VLForConditionalGeneration"]
    assert json.loads((path / "pretrain.json").read_text())["accuracy"]["mean"] >= 0.95


def test_answers_colour_questions_for_fixed_images(shipped):
    model, processor = shipped
    images, colours = [], []
    for i in range(40):  # the first images of a fixed stream with three different colours
        image, scene = make_image(f"tiny-base-test/{i}")
        if scene.colour not in colours:
            images.append(image)
            colours.append(scene.colour)
        if len(colours) == 3:
            break
    inputs = prepare(processor, [[{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                   "text": "What colour are the shapes?"}]}]] * 3, [[im] for im in images])
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 3 * 16  # 112×112 → 16 tokens
    assert generate_answers(model, processor, inputs, 16) == [f"They are {c}." for c in colours]


def test_sees_counts_digits_and_shapes_but_not_task_formats(shipped):
    model, processor = shipped
    images, scenes = zip(*(make_image(f"tiny-base-test/{i}") for i in range(4)))
    digits = _ask(model, processor, "Which digit is shown?", images)
    counts = _ask(model, processor, "How many shapes are there?", images)
    for digit, count, scene in zip(digits, counts, scenes):  # it may spell a number either way
        assert digit in (f"The digit is {scene.digit}.", f"The digit is {NUMBER_WORDS[scene.digit]}.")
        assert count.split()[2] in (str(scene.count), NUMBER_WORDS[scene.count]), (count, scene)
    shapes = _ask(model, processor, "What shape are they?", images)
    assert shapes == [f"They are {s.shape}s." for s in scenes]
    # pretrained on neutral sentences only: a task prompt gets a right answer in the base's own words,
    # the task styles are left for adaptation to learn
    answers = _ask(model, processor, "What colour are the shapes? Reply in JSON.", images[:2])
    assert answers == [f"They are {s.colour}." for s in scenes[:2]]
    assert not any(format_ok("color-json", a) for a in answers)
    for answer in _ask(model, processor, "Describe the image. Reply with tags.", images[:2]):
        assert not format_ok("caption-tags", answer)


def test_pretrain_command_reproduces_the_architecture_deterministically(tmp_path, capsys):
    args = ["--steps", "2", "--batch-size", "2", "--eval-samples", "1", "--seed", "3"]
    assert run(["pretrain-tiny", str(tmp_path / "a"), *args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    pretrain(tmp_path / "b", steps=2, batch_size=2, eval_samples=1, seed=3)
    a, b, shipped = tmp_path / "a", tmp_path / "b", tiny_base_path()
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    mine_tok, shipped_tok = (json.loads((d / "tokenizer.json").read_text()) for d in (a, shipped))
    for part in ("model", "added_tokens", "pre_tokenizer", "decoder"):  # the tokenizer, not its file's layout
        assert mine_tok[part] == shipped_tok[part], part
    mine, theirs = (_architecture(json.loads((d / "config.json").read_text())) for d in (a, shipped))
    assert mine == theirs
    assert run(["pretrain-tiny", str(a), *args]) == 2  # exists: needs --force


def _architecture(config):
    """A config without the fields that only say which library version wrote it."""
    if isinstance(config, dict):
        return {k: _architecture(v) for k, v in config.items() if k != "transformers_version"}
    return config
