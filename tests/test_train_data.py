"""Training data: both layouts detected, every bad record named by file:line (or skipped and counted),
labels only on assistant tokens, the processor's own tokens and image features, the routing span."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoProcessor

from awaker_cli.errors import AwakerError
from awaker_cli.model.routing import SpanTokens, routing_spans
from awaker_cli.train.data import IGNORE_INDEX, Encoder, StepBatches, collate, read_records

from .conftest import solid


@pytest.fixture(scope="module")
def processor(tiny_base):
    return AutoProcessor.from_pretrained(tiny_base)


@pytest.fixture(scope="module")
def tokens(processor):
    tok = processor.tokenizer
    return SpanTokens(tok.convert_tokens_to_ids("<|vision_start|>"), tok.convert_tokens_to_ids("<|im_start|>"),
                      tok.convert_tokens_to_ids("<|im_end|>"))


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "img").mkdir()
    solid((200, 30, 30)).save(tmp_path / "img" / "a.png")
    solid((30, 30, 200), (56, 112)).save(tmp_path / "img" / "b.png")
    return tmp_path


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


MESSAGES = {"messages": [{"role": "user", "content": "<image>what colour is the shape ?"},
                         {"role": "assistant", "content": "red"}], "images": ["img/a.png"]}
LLAVA = {"image": "img/b.png", "conversations": [{"from": "human", "value": "<image>\ndescribe the image ."},
                                                 {"from": "gpt", "value": "a blue square ."}]}
TEXT = {"messages": [{"role": "system", "content": "answer with a word"},
                     {"role": "user", "content": "what colour is the shape ?"}, {"role": "assistant", "content": "red"},
                     {"role": "user", "content": "and the count ?"}, {"role": "assistant", "content": "one"}]}


def encoder_for(processor, tokens, cutoff=512):
    return Encoder(processor, cutoff_len=cutoff, span_tokens=tokens, min_pixels=56 * 56, max_pixels=112 * 112)


def test_layouts_detected_jsonl_and_json(folder):
    records, stats = read_records([write_jsonl(folder / "d.jsonl", [MESSAGES, LLAVA, TEXT])])
    assert [r.layout for r in records] == ["messages", "conversations", "messages"]
    assert stats.layouts == {"messages": 2, "conversations": 1}
    assert records[1].images == [folder / "img" / "b.png"]  # relative to the data file
    assert records[1].turns[0] == ("user", "<image>\ndescribe the image .")
    assert [r.line for r in records] == [1, 2, 3]
    (folder / "d.json").write_text(json.dumps([MESSAGES, LLAVA, TEXT], indent=2))
    records, _ = read_records([folder / "d.json"])
    assert [r.layout for r in records] == ["messages", "conversations", "messages"]
    assert records[1].line > records[0].line > 1  # the line each record starts on
    with pytest.raises(AwakerError, match="conversations layout, but data.format is messages"):
        read_records([folder / "d.json"], fmt="messages")


BAD = [
    ('{"messages": [', "bad JSON"),
    ({"messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "x"}],
      "images": ["img/none.png"]}, "missing image img/none.png"),
    ({"messages": [{"role": "user", "content": "<image><image>hi"}, {"role": "assistant", "content": "x"}],
      "images": ["img/a.png"]}, "2 <image> placeholder(s) but 1 image(s)"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}],
      "images": ["img/a.png"]}, "0 <image> placeholder(s) but 1 image(s)"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "empty assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "the last turn must be the assistant's"),
    ({"text": "hello"}, "no 'messages' or 'conversations' list"),
    ({"conversations": [{"from": "alien", "value": "hi"}]}, "unknown from 'alien'"),
]


@pytest.mark.parametrize("bad,reason", BAD)
def test_bad_record_stops_with_file_line_and_reason(folder, bad, reason):
    path = write_jsonl(folder / "d.jsonl", [MESSAGES, TEXT, bad, LLAVA])
    with pytest.raises(AwakerError) as e:
        read_records([path])
    assert f"{path}:3: " in str(e.value) and reason in str(e.value), str(e.value)


def test_bad_records_skipped_and_counted(folder):
    path = write_jsonl(folder / "d.jsonl", [MESSAGES] + [b for b, _ in BAD] + [LLAVA])
    records, stats = read_records([path], skip_bad=True)
    assert [r.line for r in records] == [1, len(BAD) + 2]
    assert stats.skipped == len(BAD) and sum(stats.reasons.values()) == len(BAD)
    with pytest.raises(AwakerError, match="no usable records"):
        read_records([write_jsonl(folder / "e.jsonl", [b for b, _ in BAD])], skip_bad=True)


def test_task_limit_and_hint(folder):
    """What the --data readers of stats, prune, merge, export and eval use: the task, a limit that
    leaves the rest of the file unread, and no training hint in the error."""
    path = write_jsonl(folder / "d.jsonl", [{**MESSAGES, "task": "color"}, LLAVA, '{"broken'])
    records, stats = read_records([path], limit=2)
    assert [r.task for r in records] == ["color", None] and stats.records == 2
    with pytest.raises(AwakerError) as e:
        read_records([path], hint=None)
    assert str(e.value).startswith(f"{path}:3: bad JSON") and "skip_bad_records" not in str(e.value)
    with pytest.raises(AwakerError, match=r":1: 'task' must be a string, got int"):
        read_records([write_jsonl(folder / "t.jsonl", [{**MESSAGES, "task": 3}])])
    with pytest.raises(AwakerError, match="data file not found"):
        read_records([folder / "none.jsonl"])


def test_broken_json_array_always_stops(folder):
    (folder / "d.json").write_text('[\n' + json.dumps(MESSAGES) + ',\n{"messages": oops}\n]')
    with pytest.raises(AwakerError, match=r"d\.json:3: bad JSON"):
        read_records([folder / "d.json"], skip_bad=True)


def test_labels_only_on_assistant_tokens(folder, processor, tokens):
    records, _ = read_records([write_jsonl(folder / "d.jsonl", [MESSAGES, TEXT])])
    enc = encoder_for(processor, tokens)
    tok = processor.tokenizer
    for rec, answers in ((records[0], ["red"]), (records[1], ["red", "one"])):
        s = enc(rec)
        labeled = s["labels"] != IGNORE_INDEX
        assert torch.equal(s["labels"][labeled], s["input_ids"][labeled])
        # the labelled runs are exactly "answer<|im_end|>" of each assistant turn, in order
        runs, current = [], []
        for i in range(len(s["labels"])):
            if labeled[i]:
                current.append(int(s["input_ids"][i]))
            elif current:
                runs.append(current)
                current = []
        if current:
            runs.append(current)
        assert [tok.decode(r) for r in runs] == [a + "<|im_end|>" for a in answers]


def test_encoding_matches_the_processor(folder, processor, tokens):
    """Same input_ids, mm_token_type_ids and image features as the processor on the rendered text."""
    records, _ = read_records([write_jsonl(folder / "d.jsonl", [MESSAGES, LLAVA])])
    enc = encoder_for(processor, tokens)
    for rec in records:
        s = enc(rec)
        text = "".join(t for t, _ in enc.pieces(rec))
        from PIL import Image

        ref = processor(text=[text], images=[Image.open(p).convert("RGB") for p in rec.images],
                        images_kwargs={"size": enc.image_size}, return_tensors="pt")
        assert torch.equal(s["input_ids"], ref["input_ids"][0])
        assert torch.equal(s["mm_token_type_ids"], ref["mm_token_type_ids"][0])
        assert torch.equal(s["image_grid_thw"], ref["image_grid_thw"])
        torch.testing.assert_close(s["pixel_values"], ref["pixel_values"])


def test_routing_span_is_the_design_rule(folder, processor, tokens):
    """Image: from <|vision_start|>; text only: 2nd <|im_start|> + 2; end at the 2nd <|im_end|>."""
    records, _ = read_records([write_jsonl(folder / "d.jsonl", [MESSAGES, TEXT])])
    enc = encoder_for(processor, tokens)
    img, text = enc(records[0]), enc(records[1])
    ids = img["input_ids"].tolist()
    assert img["span"].tolist() == [ids.index(tokens.vision_start),
                                    [i for i, t in enumerate(ids) if t == tokens.im_end][1]]
    ids = text["input_ids"].tolist()
    starts = [i for i, t in enumerate(ids) if t == tokens.im_start]
    ends = [i for i, t in enumerate(ids) if t == tokens.im_end]
    assert text["span"].tolist() == [starts[1] + 2, ends[1]]
    # the span is the first user turn: "what colour is the shape ?" (after "user\n")
    assert processor.tokenizer.decode(ids[starts[1] + 2:ends[1]]).endswith("what colour is the shape ?")
    batch = collate([text, img], pad_id=0)  # right padding keeps the spans
    assert torch.equal(batch["spans"], torch.stack([text["span"], img["span"]]))
    # the same spans the model's routing hook would compute from the padded batch
    assert torch.equal(routing_spans(batch["input_ids"], batch["attention_mask"], tokens), batch["spans"])
    assert batch["labels"][0, len(ids):].eq(IGNORE_INDEX).all() and batch["attention_mask"][0, len(ids):].eq(0).all()


def test_cutoff(folder, processor, tokens):
    records, _ = read_records([write_jsonl(folder / "d.jsonl", [MESSAGES, TEXT])])
    n = len(encoder_for(processor, tokens)(records[1])["input_ids"])
    short = encoder_for(processor, tokens, cutoff=n - 3)(records[1])
    assert len(short["input_ids"]) == n - 3
    with pytest.raises(AwakerError, match=r"d\.jsonl:1: its images need more than data.cutoff_len=20"):
        encoder_for(processor, tokens, cutoff=20)(records[0])


def test_step_batches_same_records_however_split():
    """A step's records do not depend on processes × accumulation × batch size."""
    def step_set(world, accum, b, step):
        out = []
        for rank in range(world):
            s = StepBatches(24, batch_size=b, grad_accum=accum, world=world, rank=rank, seed=3, shuffle=True,
                            start_step=0, total_steps=6)
            out += s.step_indices(step).flatten().tolist()
        return sorted(out)

    for step in range(4):
        big = step_set(1, 1, 4, step)
        assert big == step_set(2, 1, 2, step) == step_set(1, 2, 2, step) == step_set(2, 2, 1, step)
    s = StepBatches(24, batch_size=2, grad_accum=2, world=1, rank=0, seed=3, shuffle=True, start_step=4,
                    total_steps=6)
    resumed = list(s)
    full = list(StepBatches(24, batch_size=2, grad_accum=2, world=1, rank=0, seed=3, shuffle=True, start_step=0,
                            total_steps=6))
    assert resumed == full[8:]  # the data position is the step


# -- at scale: one linear pass, an index instead of the records (issue 13) ----------------------------
def test_json_array_indexed_in_linear_time(folder):
    """20k pretty-printed records (17 MB): the old reader counted newlines from the file start for every
    record (quadratic: minutes here); one pass takes about a second. The bound leaves a wide margin."""
    import time

    rec = {**LLAVA, "conversations": [LLAVA["conversations"][0], {"from": "gpt", "value": "a blue square . " * 50}]}
    (folder / "big.json").write_text(json.dumps([rec] * 20_000, indent=2))
    t0 = time.perf_counter()
    records, stats = read_records([folder / "big.json"])
    assert time.perf_counter() - t0 < 10.0
    assert len(records) == stats.records == 20_000
    per_record = len(json.dumps(rec, indent=2).splitlines())
    assert records[19_999].line == 2 + 19_999 * per_record  # lines counted as the pass goes


def test_index_holds_offsets_not_records(folder):
    """What training keeps (and sends to every loader worker) does not grow with the records' text."""
    import pickle

    long = {**TEXT, "messages": [TEXT["messages"][0], {"role": "user", "content": "word " * 20_000},
                                 {"role": "assistant", "content": "red"}]}
    records, _ = read_records([write_jsonl(folder / "d.jsonl", [long] * 50)])
    size = len(pickle.dumps(records))
    assert (folder / "d.jsonl").stat().st_size > 5_000_000 and size < 20_000, size
    assert records[49].turns[1][1] == "word " * 20_000  # read back from the file when needed


def test_json_array_chunks_and_utf8(folder, monkeypatch):
    """Records cut by the reader's chunks, multi-byte characters on both sides: the same records, byte
    offsets and lines as a whole-file parse."""
    from awaker_cli.train import sources

    recs = [{**TEXT, "messages": [{"role": "user", "content": f"{i} ünïcødé ☃ {'é' * i}"},
                                  {"role": "assistant", "content": f"réponse {i}"}]} for i in range(30)]
    text = "[\n" + ",\n".join(json.dumps(r, indent=1, ensure_ascii=False) for r in recs) + "\n]\n"
    (folder / "u.json").write_text(text, encoding="utf-8")
    monkeypatch.setattr(sources, "CHUNK", 7)
    records, _ = read_records([folder / "u.json"])
    assert [r.turns for r in records] == [[("user", r["messages"][0]["content"]),
                                           ("assistant", r["messages"][1]["content"])] for r in recs]
    lines = [i + 1 for i, line in enumerate(text.splitlines()) if line == "{"]
    assert [r.line for r in records] == lines


def test_bom_null_videos_file_urls_and_system_turns(folder):
    """Inputs uniform-schema exports and other tools write: a UTF-8 BOM, "videos": null or [], a file://
    image path, a ShareGPT record with a system column and a system turn (the turn wins)."""
    file_url = {**MESSAGES, "images": [(folder / "img" / "a.png").as_uri()], "videos": None}
    both = {"system": "column", "conversations": [{"from": "system", "value": "turn"}, *LLAVA["conversations"]],
            "image": "img/b.png", "videos": []}
    for name, text in (("b.jsonl", "\n".join(json.dumps(r) for r in (file_url, both))),
                       ("b.json", json.dumps([file_url, both], indent=2))):
        (folder / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        records, _ = read_records([folder / name])
        assert records[0].images == [folder / "img" / "a.png"]
        assert records[1].turns[0] == ("system", "turn") and [r for r, _ in records[1].turns].count("system") == 1
    # the column is used when there is no system turn
    records, _ = read_records([write_jsonl(folder / "c.jsonl", [{**LLAVA, "system": "column"}])])
    assert records[0].turns[0] == ("system", "column")


@pytest.mark.parametrize("tag", ["<video>", "<audio>"])
def test_video_and_audio_tags_without_media_are_refused(folder, tag):
    rec = {"messages": [{"role": "user", "content": f"{tag}what happens ?"}, {"role": "assistant", "content": "x"}]}
    with pytest.raises(AwakerError, match=rf"d\.jsonl:1: has a {tag} tag: videos and audio are not supported"):
        read_records([write_jsonl(folder / "d.jsonl", [rec])])
    with pytest.raises(AwakerError, match="videos and audio are not supported"):
        read_records([write_jsonl(folder / "v.jsonl", [{**MESSAGES, "videos": ["a.mp4"]}])])


def test_answer_cut_away_by_cutoff_is_a_bad_record(folder, processor, tokens):
    """Before, such a sample trained on nothing (loss 0, no warning)."""
    from awaker_cli.train.data import BadRecord

    long = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "red"}]}
    records, _ = read_records([write_jsonl(folder / "d.jsonl", [long])])
    enc = encoder_for(processor, tokens, cutoff=64)
    with pytest.raises(BadRecord, match="answer starts after data.cutoff_len=64") as e:
        enc.encode(records[0])
    assert e.value.kind == "answer beyond cutoff_len"


def test_dataset_skips_records_that_fail_when_decoded(folder, processor, tokens):
    """A truncated JPEG passes the header check and fails only when decoded; with skip_bad the sample is
    replaced by the next record and the skip reported with the sample; without, file:line stops."""
    from awaker_cli.train.data import RecordDataset

    from io import BytesIO

    from PIL import Image

    buf = BytesIO()  # noise: the scan data is most of the file, so cutting it leaves the header whole
    noise = torch.randint(0, 256, (112, 112, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Image.fromarray(noise.numpy()).save(buf, "JPEG")
    (folder / "img" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    cut = {**MESSAGES, "images": ["img/cut.jpg"]}
    path = write_jsonl(folder / "d.jsonl", [MESSAGES, cut, LLAVA])
    records, stats = read_records([path])
    assert stats.records == 3  # the header reads
    enc = encoder_for(processor, tokens)
    ds = RecordDataset(records, enc, skip_bad=True)
    sample = ds[1]
    assert sample["skipped"] == [(f"{path}:2", "image does not decode")]
    assert torch.equal(sample["input_ids"], enc(records[2])["input_ids"])  # the next record instead
    assert collate([ds[0], sample], 0)["skipped"] == [(f"{path}:2", "image does not decode")]
    with pytest.raises(AwakerError, match=r"d\.jsonl:2: cannot decode image .*skip_bad_records"):
        RecordDataset(records, enc)[1]


def test_image_settings_override_the_processor(folder, processor):
    from awaker_cli.ops.records import encode

    records, _ = read_records([write_jsonl(folder / "d.jsonl", [{**MESSAGES, "images": ["img/b.png"]}])])
    n = lambda batch: int(batch["mm_token_type_ids"].sum())  # noqa: E731
    assert n(encode(processor, records, max_pixels=56 * 56)) == 2 < n(encode(processor, records)) == 8


def test_a_file_replaced_after_indexing_is_noticed(folder):
    """The same path rewritten (a re-run demo, a regenerated file): a new index reads the new bytes (not
    through a file the first index left open), an index made before refuses them."""
    path = write_jsonl(folder / "d.jsonl", [MESSAGES, LLAVA])
    first, _ = read_records([path])
    unread, _ = read_records([path])
    assert first[1].layout == "conversations"  # opens the file
    (folder / "tmp.jsonl").write_text(json.dumps(TEXT) + "\n" + json.dumps(MESSAGES) + "\n")
    (folder / "tmp.jsonl").replace(path)
    new, _ = read_records([path])
    assert [r.layout for r in new] == ["messages", "messages"] and new[0].turns[0] == ("system", "answer with a word")
    with pytest.raises(AwakerError, match=r"d\.jsonl:2: the data file changed since it was indexed"):
        unread[1]
