"""`awaker data inspect`: the training reader and encoder's view of a data set, sample by sample and
over the whole set."""
from __future__ import annotations

import json

from transformers import AutoProcessor

from awaker_cli.cli import run
from awaker_cli.train.data import Encoder, read_records

from .conftest import solid


def test_inspect_renders_samples_and_summarises_the_set(tiny_base, tmp_path, capsys):
    (tmp_path / "img").mkdir()
    solid((200, 30, 30), (112, 112)).save(tmp_path / "img" / "a.png")
    good = {"messages": [{"role": "user", "content": "<image>what colour ?"}, {"role": "assistant", "content": "red"}],
            "images": ["img/a.png"]}
    text = {"conversations": [{"from": "human", "value": "count ?"}, {"from": "gpt", "value": "three"}]}
    long = {"messages": [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok"}]}
    missing = {**good, "images": ["img/none.png"]}
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (good, text, long, missing)))
    enc = Encoder(AutoProcessor.from_pretrained(tiny_base), cutoff_len=None, span_tokens=None)
    records, _ = read_records([path], skip_bad=True)
    lengths = sorted(len(enc(r)["input_ids"]) for r in records)
    cutoff = lengths[1]  # the long record's answer is beyond it
    assert run(["data", "inspect", str(path), "--recipe", "tiny-stage1", f"model={tiny_base}",
                f"data.cutoff_len={cutoff}", "-n", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    m = out["summary"]
    assert m["records"] == 4 and m["usable"] == 2 and m["skipped"] == 2
    assert m["skip_reasons"] == {"missing image": 1, "answer beyond cutoff_len": 1}
    assert m["tokens"] == {"min": lengths[0], "median": lengths[1], "p95": lengths[2], "max": lengths[2]}
    assert m["over_cutoff_len"] == 1 and m["images_per_record"] == {"0": 2, "1": 1}
    first = out["samples"][0]
    assert "".join(s["text"] for s in first["segments"] if s["trained"]) == "red<|im_end|>"
    assert first["images"] == [{"source": str(tmp_path / "img" / "a.png"), "size": [112, 112],
                                "resized": [112, 112], "tokens": 16}]
    assert [s["image_tokens"] for s in first["segments"] if s["image_tokens"]] == [16]
    assert any(s["span"] for s in first["segments"])
    # without --json: one rendering per sample and the summary table, on stderr
    assert run(["data", "inspect", str(path), "--model", str(tiny_base), "-n", "1"]) == 0
    err = capsys.readouterr().err
    assert "[[red<|im_end|>]]" in err and "the whole set" in err and "missing image (1)" in err
