"""Training data in the formats users already have: alpaca, content lists, LLaMA-Factory's
dataset_info.json registry and Hugging Face datasets (save_to_disk folders, parquet, arrow; images as
bytes or paths), each on a fixture built here, read by the one training reader."""
from __future__ import annotations

import io
import json

import pytest
from transformers import AutoProcessor

from awaker_cli.errors import AwakerError
from awaker_cli.train.data import Encoder, ImageBytes, read_records

from .conftest import solid

QUESTION, ANSWER = "what colour is the shape ?", "red"


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "img").mkdir()
    solid((200, 30, 30)).save(tmp_path / "img" / "a.png")
    return tmp_path


def jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def png_bytes(color=(200, 30, 30)):
    buf = io.BytesIO()
    solid(color).save(buf, "PNG")
    return buf.getvalue()


def test_alpaca_layout(folder):
    """LLaMA-Factory's conversion: system, history pairs, then instruction + "\\n" + input."""
    rec = {"instruction": "<image>" + QUESTION, "input": "one word", "output": ANSWER, "system": "be brief",
           "history": [["hello", "hi"]], "images": ["img/a.png"]}
    records, stats = read_records([jsonl(folder / "a.jsonl", [rec, {"instruction": "q", "output": "a"}])])
    assert records[0].turns == [("system", "be brief"), ("user", "hello"), ("assistant", "hi"),
                                ("user", f"<image>{QUESTION}\none word"), ("assistant", ANSWER)]
    assert records[0].images == [folder / "img" / "a.png"] and stats.layouts == {"alpaca": 2}
    assert records[1].turns == [("user", "q"), ("assistant", "a")]


def test_content_list_layout(folder):
    """Content lists (OpenAI, TRL, Qwen finetune code): image items become placeholders, in place; an
    image given inline is the record's image."""
    inline = {"messages": [{"role": "user", "content": [{"type": "image", "image": "img/a.png"},
                                                        {"type": "text", "text": QUESTION}]},
                           {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}]}
    column = {"messages": [{"role": "user", "content": [{"type": "text", "text": "look: "}, {"type": "image"}]},
                           {"role": "assistant", "content": ANSWER}], "images": ["img/a.png"]}
    records, _ = read_records([jsonl(folder / "c.jsonl", [inline, column])])
    assert records[0].turns == [("user", "<image>" + QUESTION), ("assistant", ANSWER)]
    assert records[1].turns[0] == ("user", "look: <image>")
    assert records[0].images == records[1].images == [folder / "img" / "a.png"]
    bad = {"messages": [{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]},
                        {"role": "assistant", "content": ANSWER}]}
    with pytest.raises(AwakerError, match=r"b\.jsonl:1: turn 1 content has a video item"):
        read_records([jsonl(folder / "b.jsonl", [bad])])


def test_llamafactory_registry(folder):
    """data.dataset names entries of dataset_info.json: sharegpt with columns and openai-style tags,
    alpaca with remapped columns; images relative to dataset_dir; two names, comma-separated."""
    (folder / "data").mkdir()
    (folder / "data" / "img").mkdir()
    solid((30, 200, 30)).save(folder / "data" / "img" / "g.png")
    jsonl(folder / "data" / "chat.jsonl", [{"dialog": [{"speaker": "person", "text": "<image>" + QUESTION},
                                                       {"speaker": "machine", "text": "green"}], "pics": ["img/g.png"],
                                            "sys": "be brief"}])
    (folder / "data" / "qa.json").write_text(json.dumps([{"q": "2 + 2 ?", "a": "4"}], indent=2))
    (folder / "data" / "dataset_info.json").write_text(json.dumps({
        "chat": {"file_name": "chat.jsonl", "formatting": "sharegpt",
                 "columns": {"messages": "dialog", "images": "pics", "system": "sys"},
                 "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "person",
                          "assistant_tag": "machine"}},
        "qa": {"file_name": "qa.json", "columns": {"prompt": "q", "response": "a"}},
        "remote": {"hf_hub_url": "someone/data"},
    }))
    records, stats = read_records([], dataset="chat,qa", dataset_dir=str(folder / "data"))
    assert [r.turns for r in records] == [[("system", "be brief"), ("user", "<image>" + QUESTION),
                                           ("assistant", "green")], [("user", "2 + 2 ?"), ("assistant", "4")]]
    assert records[0].images == [(folder / "data" / "img" / "g.png").resolve()]
    assert stats.layouts == {"conversations": 1, "alpaca": 1}
    with pytest.raises(AwakerError, match="no 'nope' in .*dataset_info.json"):
        read_records([], dataset="nope", dataset_dir=str(folder / "data"))
    with pytest.raises(AwakerError, match="remote: only local files are read"):
        read_records([], dataset="remote", dataset_dir=str(folder / "data"))


def test_recipe_takes_a_registry_dataset(folder):
    from awaker_cli.train import load_recipe
    from awaker_cli.train.recipe import require_paths

    r = load_recipe("tiny-stage1", ["model=m", "output_dir=o", "data.train=[]", "data.dataset=a,b",
                                    f"data.dataset_dir={folder}"])
    assert r.data.dataset == ["a,b"] and r.data.train == []
    require_paths(r)  # data.dataset is training data too
    with pytest.raises(AwakerError, match="no training data"):
        require_paths(load_recipe("tiny-stage1", ["model=m", "output_dir=o", "data.train=[]"]))


import datasets  # noqa: E402  (in the dev extra: these tests must run, not skip)


def hf_rows(folder):
    return {"messages": [[{"role": "user", "content": "<image>" + QUESTION}, {"role": "assistant", "content": ANSWER}],
                         [{"role": "user", "content": "<image>" + QUESTION}, {"role": "assistant", "content": "blue"}]],
            "images": [[{"bytes": png_bytes(), "path": None}], [{"bytes": None, "path": str(folder / "img" / "a.png")}]],
            "task": ["color", "color"]}


def hf_dataset(folder):
    features = datasets.Features({
        "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        "images": datasets.Sequence(datasets.Image()), "task": datasets.Value("string")})
    return datasets.Dataset.from_dict(hf_rows(folder), features=features)


@pytest.mark.parametrize("kind", ["parquet", "save_to_disk", "arrow", "dataset_dict"])
def test_hugging_face_datasets(folder, kind, tiny_base):
    """Images as bytes (the Image feature) and as paths; decoded only when encoded."""
    ds = hf_dataset(folder)
    if kind == "parquet":
        path = folder / "train.parquet"
        ds.to_parquet(str(path))
    elif kind == "arrow":
        path = folder / "saved"
        ds.save_to_disk(str(path))
        path = next(path.glob("*.arrow"))
    else:
        path = folder / "saved"
        (datasets.DatasetDict({"train": ds}) if kind == "dataset_dict" else ds).save_to_disk(str(path))
    records, stats = read_records([path])
    assert stats.records == 2 and [r.task for r in records] == ["color", "color"]
    assert isinstance(records[0].images[0], ImageBytes) and records[0].where == f"{path}:row 0"
    # a path stays a path (or becomes the bytes, if datasets embedded the file)
    assert records[1].images[0] == folder / "img" / "a.png" or isinstance(records[1].images[0], ImageBytes)
    assert records[1].turns[-1] == ("assistant", "blue")
    processor = AutoProcessor.from_pretrained(tiny_base)
    enc = Encoder(processor, cutoff_len=512, span_tokens=None)
    n_image = [int((enc(r)["input_ids"] == processor.image_token_id).sum()) for r in records]
    assert n_image[0] == n_image[1] > 0  # the same 84×56 picture, from bytes and from its path


def test_hf_bad_rows_name_the_row(folder):
    rows = hf_rows(folder)
    rows["messages"][1] = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "x"}]
    datasets.Dataset.from_dict(rows).to_parquet(str(folder / "d.parquet"))
    with pytest.raises(AwakerError, match=r"d\.parquet:row 1: 0 <image> placeholder\(s\) but 1 image\(s\)"):
        read_records([folder / "d.parquet"])
    records, stats = read_records([folder / "d.parquet"], skip_bad=True)
    assert len(records) == 1 and stats.skipped == 1
