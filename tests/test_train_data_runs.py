"""What a training run does with its data (issue 13): the image settings it trained with travel with
the model, records that fail only when decoded are skipped and counted instead of stopping the run,
and the balance loss is the step's, whatever the micro-batch size."""
from __future__ import annotations

import io
import json

import pytest
import torch
from transformers import AutoProcessor

from awaker_cli.cli import run
from awaker_cli.errors import AwakerError
from awaker_cli.train import load_recipe
from awaker_cli.train.data import Encoder, read_records
from awaker_cli.train.loop import train
from awaker_cli.train.synthetic import write_synthetic_dataset

from .conftest import model_tensors, solid

FAST = ["train.progress=false", "train.logging_steps=1", "train.warmup_steps=1", "train.scheduler=constant"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("data"), n=4, text_only_every=4)


@pytest.fixture(scope="module")
def small_images(tiny_base, data, tmp_path_factory):
    """A stage-1 run at max_pixels=3136 (the base's processor allows 12544)."""
    out = tmp_path_factory.mktemp("s1") / "out"
    train(load_recipe("tiny-stage1", [f"model={tiny_base}", f"data.train={data}", f"output_dir={out}",
                                      "data.min_pixels=3136", "data.max_pixels=3136", "train.batch_size=4",
                                      "train.grad_accum=1", "train.max_steps=2", "train.lr=1e-2", *FAST]), quiet=True)
    return out


def image_tokens(processor, records) -> list[int]:
    from awaker_cli.ops.records import encode

    batch = encode(processor, records)
    return batch["mm_token_type_ids"].sum(1).tolist()


def test_trained_model_carries_its_image_settings(small_images, tiny_base, data):
    """stats, prune, merge, export, eval and chat read the model's processor: it must be training's."""
    from awaker_cli.ops.records import load_processor

    records, _ = read_records([data])
    trained, base = load_processor(small_images), load_processor(tiny_base)
    assert trained.image_processor.size["longest_edge"] == 3136
    assert image_tokens(trained, records) == [4, 4, 4, 0]  # 56×56 pixels: 4 merged tokens per image
    assert image_tokens(base, records) == [4, 16, 4, 0]  # the base's limits keep the larger image larger


def test_stats_on_a_stage1_model_is_one_line(small_images, data, capsys):
    assert run(["stats", str(small_images), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert "plain-LoRA model (stage 1) has no routers" in err and len(err.splitlines()) == 1 and "internal" not in err


def truncated_jpeg(path):
    buf = io.BytesIO()  # noise: the scan data is most of the file, so cutting it leaves the header whole
    noise = torch.randint(0, 256, (112, 112, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    from PIL import Image

    Image.fromarray(noise.numpy()).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])


@pytest.fixture
def messy(tmp_path, tiny_base):
    """Four good records; then one whose image does not decode, one whose images exceed cutoff_len, one
    whose answer is cut away by it, and one with a missing image (found before step 1)."""
    (tmp_path / "img").mkdir()
    solid((200, 30, 30), (56, 56)).save(tmp_path / "img" / "s.png")
    solid((30, 30, 200), (112, 112)).save(tmp_path / "img" / "l.png")
    truncated_jpeg(tmp_path / "img" / "cut.jpg")

    def rec(q, images=(), a="red"):
        return {"messages": [{"role": "user", "content": "<image>" * len(images) + q},
                             {"role": "assistant", "content": a}], "images": list(images)}

    good = [rec("what colour ?", ["img/s.png"]), rec("and now ?", ["img/s.png"]), rec("colour ?"), rec("well ?")]
    enc = Encoder(AutoProcessor.from_pretrained(tiny_base), cutoff_len=None, span_tokens=None)
    records, _ = read_records([_jsonl(tmp_path / "probe.jsonl", good)])
    cutoff = max(len(enc(r)["input_ids"]) for r in records)
    bad = [rec("colour ?", ["img/cut.jpg"]), rec("colour ?", ["img/l.png"] * 3),
           rec("word " * cutoff), rec("colour ?", ["img/none.png"])]
    return _jsonl(tmp_path / "d.jsonl", good + bad), cutoff


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_records_failing_when_decoded_are_skipped_and_counted(messy, tiny_base, tmp_path, capsys):
    """Before: a truncated JPEG stopped the run at step N, images beyond cutoff_len after step 1, and an
    answer cut away trained on nothing (loss 0)."""
    path, cutoff = messy
    out = tmp_path / "out"
    argv = ["train", "--recipe", "tiny-stage1", f"model={tiny_base}", f"data.train={path}", f"output_dir={out}",
            f"data.cutoff_len={cutoff}", "data.skip_bad_records=true", "data.shuffle=false", "train.batch_size=1",
            "train.grad_accum=1", "train.epochs=1", *FAST]
    assert run(argv) == 0
    err = capsys.readouterr().err
    flat = " ".join(err.split())  # the console wraps long lines
    first = flat[flat.index("stage 1 from"):flat.index("trainable parameters")]
    assert "1 bad record(s) skipped (missing image (1))" in first  # found before step 1: in the first line
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 7 and metrics[-1]["skipped_records"] == 3
    assert all(m["loss"] > 0 for m in metrics)  # no step trained on nothing
    state = json.loads((out / "train_state.json").read_text())["data"]
    assert state["skipped_while_training"] == 3 and state["skip_reasons_while_training"] == {
        "image does not decode": 1, "images exceed cutoff_len": 1, "answer beyond cutoff_len": 1}
    for line in (f"{path}:5: image does not decode", f"{path}:6: images exceed cutoff_len"):
        assert line in flat
    # without skip_bad_records the first such record stops the run, naming it
    strict = _jsonl(tmp_path / "e.jsonl", [json.loads(x) for x in path.read_text().splitlines()[:5]])
    with pytest.raises(AwakerError, match=r"e\.jsonl:5: cannot decode image .*skip_bad_records=true"):
        train(load_recipe("tiny-stage1", [f"model={tiny_base}", f"data.train={strict}", f"output_dir={tmp_path / 'o2'}",
                                          "data.shuffle=false", "train.batch_size=1", "train.grad_accum=1", *FAST]),
              quiet=True)


def routers(out):
    return {k: v for k, v in model_tensors(out).items() if "router" in k}


def test_balance_loss_is_the_steps_at_any_micro_batch_size(small_images, data, tmp_path):
    """4 micro-batches of 1 and one batch of 4 make the same router update, balance loss included.
    Before, at batch size 1 each micro-batch's loss was a constant (one-hot histograms) with no gradient."""
    outs = {}
    for b, accum, coef in ((4, 1, 1.0), (1, 4, 1.0), (1, 4, 0.0)):
        out = tmp_path / f"b{b}-c{coef}"
        train(load_recipe("tiny-stage2", [f"init_from={small_images}", f"data.train={data}", f"output_dir={out}",
                                          f"train.batch_size={b}", f"train.grad_accum={accum}", "train.max_steps=1",
                                          "train.lr=1e-2", f"train.balance_loss_coef={coef}", "adapter.dropout=0",
                                          "adapter.router_noise_std=0", "data.shuffle=false", *FAST]), quiet=True)
        outs[b, coef] = out
    one, four = (json.loads((outs[b, 1.0] / "metrics.jsonl").read_text().splitlines()[0]) for b in (1, 4))
    assert one["balance_loss"] == pytest.approx(four["balance_loss"], rel=1e-5) and four["balance_loss"] > 0
    a, b, without = routers(outs[4, 1.0]), routers(outs[1, 1.0]), routers(outs[1, 0.0])
    assert a and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    assert any(not torch.allclose(b[k].float(), without[k].float(), atol=1e-4) for k in b)  # the loss acts


def test_balance_loss_replays_router_noise(small_images, data, tmp_path):
    """With router noise, the earlier micro-batches' routers are re-run with their own noise (their RNG
    state): the step's loss is finite and training goes on."""
    out = tmp_path / "noisy"
    result = train(load_recipe("tiny-stage2", [f"init_from={small_images}", f"data.train={data}", f"output_dir={out}",
                                               "train.batch_size=1", "train.grad_accum=4", "train.max_steps=2",
                                               "train.balance_loss_coef=0.5", *FAST]), quiet=True)
    assert result["step"] == 2
    assert all(json.loads(line)["balance_loss"] > 0 for line in (out / "metrics.jsonl").read_text().splitlines())
