"""Training data: the two record layouts users already have, checked up front, encoded with the
model's own chat template, labels on assistant tokens only, and the routing span of every sample.

Layouts (detected per record unless data.format says which):
- messages (LLaMA-Factory): {"messages": [{"role": "user", "content": "<image>What…"},
  {"role": "assistant", "content": "…"}], "images": ["img/1.png"]}
- conversations (LLaVA / Qwen / LLaMA-Factory sharegpt): {"image": "a.jpg", "conversations":
  [{"from": "human", "value": "<image>\\n…"}, {"from": "gpt", "value": "…"}]}

Files are JSONL (one record a line) or JSON (an array of records): the first character decides.
Image paths are relative to the data file's directory (or data.image_root). One `<image>` placeholder
per image, in user turns only. An optional `task` string labels the record (stats and eval report per
task). A bad record stops the run with `file:line: reason`, or is skipped and counted with
data.skip_bad_records. A JSON array that is not valid JSON cannot be resynchronised: that always stops
the run.

This is the one reader of chat data files: `--data` files of stats, prune, merge, export
(ops/records.py) and eval (evaluate/data.py) are read and checked here too.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import AwakerError
from ..model.routing import SpanTokens, routing_spans

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100
_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
          "bot": "assistant", "model": "assistant"}


class BadRecord(Exception):
    """A record that cannot be trained on; str() is the reason."""


@dataclass
class Record:
    file: Path
    line: int
    layout: str
    turns: list[tuple[str, str]]  # (system|user|assistant, text with <image> placeholders)
    images: list[Path]
    task: str | None = None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class DataStats:
    records: int = 0
    skipped: int = 0
    layouts: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"records": self.records, "skipped": self.skipped, "layouts": dict(self.layouts),
                "skip_reasons": dict(self.reasons), "files": self.files}


# -- reading -----------------------------------------------------------------------------------------
def _iter_raw(path: Path):
    """(line, parsed object or a BadRecord) for every record of a JSON or JSONL file."""
    if not path.is_file():
        raise AwakerError(f"{path}: data file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise AwakerError(f"{path}: cannot read ({e.strerror})")
    except UnicodeDecodeError:
        raise AwakerError(f"{path}: not UTF-8 text")
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from _iter_json_array(path, text)
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            yield n, BadRecord(f"bad JSON ({e.msg} at column {e.colno})")


def _iter_json_array(path: Path, text: str):
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    ws = re.compile(r"\s*")
    first = True
    while True:
        i = ws.match(text, i).end()
        if i >= len(text):
            raise AwakerError(f"{path}:{text.count(chr(10), 0, i) + 1}: bad JSON (the array is not closed)")
        if text[i] == "]":
            return
        if not first:
            if text[i] != ",":
                raise AwakerError(f"{path}:{text.count(chr(10), 0, i) + 1}: bad JSON (expected ',' or ']' "
                                  "between records)")
            i = ws.match(text, i + 1).end()
        first = False
        line = text.count("\n", 0, i) + 1
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise AwakerError(f"{path}:{e.lineno}: bad JSON ({e.msg} at column {e.colno}); "
                              "a broken JSON array cannot be skipped")
        yield line, obj


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise BadRecord(f"{what} must be a string, got {type(value).__name__}")
    return value


def _parse(obj, fmt: str) -> tuple[str, list[tuple[str, str]], list[str], str | None]:
    if not isinstance(obj, dict):
        raise BadRecord(f"a record must be a JSON object, got {type(obj).__name__}")
    has_m, has_c = "messages" in obj, "conversations" in obj
    if has_m and has_c:
        raise BadRecord("has both 'messages' and 'conversations'")
    layout = "messages" if has_m else "conversations" if has_c else None
    if layout is None:
        raise BadRecord("no 'messages' or 'conversations' list")
    if fmt != "auto" and layout != fmt:
        raise BadRecord(f"is in the {layout} layout, but data.format is {fmt}")
    if any(k in obj for k in ("video", "videos")):
        raise BadRecord("videos are not supported")
    raw_turns = obj[layout]
    if not isinstance(raw_turns, list) or not raw_turns:
        raise BadRecord(f"'{layout}' must be a non-empty list")
    role_key, text_key = ("role", "content") if layout == "messages" else ("from", "value")
    turns = []
    if "system" in obj and obj["system"] is not None:
        turns.append(("system", _text(obj["system"], "'system'")))
    for i, t in enumerate(raw_turns, 1):
        if not isinstance(t, dict) or role_key not in t or text_key not in t:
            raise BadRecord(f"turn {i} needs '{role_key}' and '{text_key}'")
        role = _ROLES.get(str(t[role_key]).lower())
        if role is None:
            raise BadRecord(f"turn {i} has an unknown {role_key} {t[role_key]!r}")
        turns.append((role, _text(t[text_key], f"turn {i} {text_key}")))
    if "images" in obj and "image" in obj:
        raise BadRecord("has both 'image' and 'images'")
    images = obj.get("images", obj.get("image")) or []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise BadRecord("'images' must be a path or a list of paths")
    task = obj.get("task")
    if task is not None:
        _text(task, "'task'")
    return layout, turns, images, task


def _check_turns(turns: list[tuple[str, str]], n_images: int):
    body = turns[1:] if turns[0][0] == "system" else turns
    if not body:
        raise BadRecord("no user or assistant turn")
    for i, (role, text) in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            raise BadRecord(f"turn {i + 1} is a {role} turn where a {want} turn belongs "
                            "(turns alternate user, assistant after an optional system turn)")
        if role == "assistant" and not text.strip():
            raise BadRecord(f"empty assistant turn (turn {i + 1})")
        if role == "assistant" and IMAGE_PLACEHOLDER in text:
            raise BadRecord(f"{IMAGE_PLACEHOLDER} in an assistant turn (turn {i + 1})")
    if body[-1][0] != "assistant":
        raise BadRecord("the last turn must be the assistant's")
    if turns[0][0] == "system" and IMAGE_PLACEHOLDER in turns[0][1]:
        raise BadRecord(f"{IMAGE_PLACEHOLDER} in the system turn")
    placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if placeholders != n_images:
        raise BadRecord(f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {n_images} image(s)")


def _resolve_images(images: list[str], base: Path) -> list[Path]:
    from PIL import Image, UnidentifiedImageError

    out = []
    for p in images:
        path = Path(p).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise BadRecord(f"missing image {p} (looked for {path})")
        try:
            with Image.open(path):  # reads the header only
                pass
        except (UnidentifiedImageError, OSError) as e:
            raise BadRecord(f"image {p} is not a readable image ({type(e).__name__})")
        out.append(path)
    return out


SKIP_HINT = "set data.skip_bad_records=true to skip such records"


def read_records(files: list[str | Path], *, fmt: str = "auto", image_root: str | None = None,
                 skip_bad: bool = False, limit: int | None = None,
                 hint: str | None = SKIP_HINT) -> tuple[list[Record], DataStats]:
    """Every record of every file, checked (structure, roles, placeholders, images on disk).

    limit: stop after that many usable records (the rest of the data is not read).
    hint: appended in parentheses to a bad record's error (None for commands without a skip option).
    """
    stats = DataStats()
    records: list[Record] = []
    for f in files:
        if limit is not None and len(records) >= limit:
            break
        path = Path(f)
        stats.files.append(str(path))
        base = Path(image_root) if image_root else path.resolve().parent
        for line, obj in _iter_raw(path):
            if limit is not None and len(records) >= limit:
                break
            try:
                if isinstance(obj, BadRecord):
                    raise obj
                layout, turns, images, task = _parse(obj, fmt)
                _check_turns(turns, len(images))
                resolved = _resolve_images(images, base)
            except BadRecord as e:
                if not skip_bad:
                    raise AwakerError(f"{path}:{line}: {e}" + (f" ({hint})" if hint else ""))
                stats.skipped += 1
                stats.reasons[str(e).split(" (")[0]] += 1
                continue
            stats.layouts[layout] += 1
            records.append(Record(path, line, layout, turns, resolved, task))
    stats.records = len(records)
    if not records:
        raise AwakerError(f"no usable records in {', '.join(map(str, files))}"
                          + (f" ({stats.skipped} skipped)" if stats.skipped else ""))
    return records, stats


# -- encoding ----------------------------------------------------------------------------------------
def _content(text: str):
    """'<image>abc<image>' -> chat-template content items, images in place of the placeholders."""
    if IMAGE_PLACEHOLDER not in text:
        return text
    items = []
    for i, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            items.append({"type": "image"})
        if part:  # kept exactly as written, as LLaMA-Factory's template does
            items.append({"type": "text", "text": part})
    return items


def chat_messages(turns: list[tuple[str, str]]) -> list[dict]:
    """Turns -> the messages the processor's chat template renders (images placed in user turns)."""
    return [{"role": role, "content": _content(text) if role == "user" else text} for role, text in turns]


class Encoder:
    """Record -> model inputs of one sample: input_ids, labels (assistant content + <|im_end|>),
    mm_token_type_ids, pixel_values / image_grid_thw, and the routing span [2] (docs/design.md section 1).

    cutoff_len None keeps whole records; span_tokens None leaves the span out (the model then finds it
    itself with the same rule, as in chat and eval)."""

    def __init__(self, processor, *, cutoff_len: int | None, span_tokens: SpanTokens | None,
                 span_rule: str = "prompt", min_pixels: int | None = None, max_pixels: int | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.cutoff_len = cutoff_len
        self.span_tokens = span_tokens
        self.span_rule = span_rule
        ip = processor.image_processor
        size = dict(getattr(ip, "size", None) or {})
        self.image_size = {"shortest_edge": min_pixels or size.get("shortest_edge") or ip.min_pixels,
                           "longest_edge": max_pixels or size.get("longest_edge") or ip.max_pixels}
        self.merge = ip.merge_size
        self.image_token = processor.image_token
        self.image_token_id = processor.image_token_id
        self.im_end = "<|im_end|>"
        if span_tokens is not None and self.tokenizer.convert_tokens_to_ids(self.im_end) != span_tokens.im_end:
            raise AwakerError("the tokenizer's <|im_end|> does not match the model's span tokens")

    def _render(self, conversation, generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(conversation, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def pieces(self, rec: Record) -> list[tuple[str, bool]]:
        """The rendered conversation cut into (text, is_label) pieces."""
        conv = chat_messages(rec.turns)
        full = self._render(conv, False)
        out, pos = [], 0
        for i, (role, _) in enumerate(rec.turns):
            if role != "assistant":
                continue
            before = self._render(conv[:i], True)
            through = self._render(conv[: i + 1], False)
            if not (through.startswith(before) and full.startswith(through) and len(before) >= pos):
                raise AwakerError("the chat template does not render conversations turn by turn; "
                                  "cannot find the assistant tokens to train on")
            k = through.rfind(self.im_end, len(before))
            if k < 0:
                raise AwakerError(f"the chat template does not end an assistant turn with {self.im_end}")
            end = k + len(self.im_end)
            out += [(full[pos:len(before)], False), (full[len(before):end], True)]
            pos = end
        out.append((full[pos:], False))
        return [(t, lab) for t, lab in out if t]

    def __call__(self, rec: Record) -> dict:
        try:
            return self._encode(rec)
        except BadRecord as e:
            raise AwakerError(f"{rec.where}: {e}")

    def _encode(self, rec: Record) -> dict:
        from PIL import Image

        pieces = self.pieces(rec)
        pixel_values = grid = None
        counts: list[int] = []
        if rec.images:
            images = []
            for p in rec.images:
                try:
                    with Image.open(p) as im:
                        images.append(im.convert("RGB"))
                except OSError as e:
                    raise BadRecord(f"cannot decode image {p} ({e})")
            out = self.processor.image_processor(images=images, size=self.image_size, return_tensors="pt")
            pixel_values, grid = out["pixel_values"], out["image_grid_thw"]
            counts = [int(g.prod()) // self.merge**2 for g in grid]
        queue = list(counts)

        def expand(m):
            if not queue:
                raise BadRecord("the chat template produced more image tokens than the record has images")
            return self.image_token * queue.pop(0)

        ids, labels = [], []
        for text, is_label in pieces:
            text = re.sub(re.escape(self.image_token), expand, text)
            piece = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if is_label else [IGNORE_INDEX] * len(piece)
        n_image_tokens = sum(counts)
        if queue or sum(1 for t in ids if t == self.image_token_id) != n_image_tokens:
            raise BadRecord("the image tokens do not match the images (check the <image> placeholders)")
        if self.cutoff_len is not None and len(ids) > self.cutoff_len:
            kept = sum(1 for t in ids[: self.cutoff_len] if t == self.image_token_id)
            if kept != n_image_tokens:
                raise BadRecord(f"its images need more than data.cutoff_len={self.cutoff_len} tokens "
                                "(raise cutoff_len or lower data.max_pixels)")
            ids, labels = ids[: self.cutoff_len], labels[: self.cutoff_len]
        input_ids = torch.tensor(ids, dtype=torch.long)
        mm = (input_ids == self.image_token_id).long()  # 1 = image token, as the processor marks them
        sample = {"input_ids": input_ids, "labels": torch.tensor(labels, dtype=torch.long),
                  "mm_token_type_ids": mm, "pixel_values": pixel_values, "image_grid_thw": grid}
        if self.span_tokens is not None:
            sample["span"] = routing_spans(input_ids[None], None, self.span_tokens, self.span_rule)[0]
        return sample


def collate(samples: list[dict], pad_id: int) -> dict:
    """Right-padded batch; the spans are token positions, so right padding leaves them unchanged."""
    length = max(s["input_ids"].shape[0] for s in samples)
    n = len(samples)
    batch = {
        "input_ids": torch.full((n, length), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(n, length, dtype=torch.long),
        "labels": torch.full((n, length), IGNORE_INDEX, dtype=torch.long),
        "mm_token_type_ids": torch.zeros(n, length, dtype=torch.long),
    }
    for i, s in enumerate(samples):
        t = s["input_ids"].shape[0]
        batch["input_ids"][i, :t] = s["input_ids"]
        batch["attention_mask"][i, :t] = 1
        batch["labels"][i, :t] = s["labels"]
        batch["mm_token_type_ids"][i, :t] = s["mm_token_type_ids"]
    pixels = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
        batch["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in samples if s["image_grid_thw"] is not None])
    if "span" in samples[0]:
        batch["spans"] = torch.stack([s["span"] for s in samples])
    return batch


class RecordDataset(torch.utils.data.Dataset):
    def __init__(self, records: list[Record], encoder: Encoder):
        self.records, self.encoder = records, encoder

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.encoder(self.records[i])


class StepBatches(torch.utils.data.Sampler):
    """The micro-batches (lists of record indices) of one process, from a given optimizer step on.

    Every optimizer step takes the next `global_batch` = world × grad_accum × batch_size records of its
    epoch's permutation (seed + epoch; identity without shuffling; the last incomplete global batch of an
    epoch is dropped). That chunk is laid out [grad_accum, world, batch_size]: process r gets
    chunk[:, r, :]. So the set of records of a step does not depend on how it is split over processes
    and micro-batches, and the position of the data is just the step number.
    """

    def __init__(self, num_records: int, *, batch_size: int, grad_accum: int, world: int, rank: int,
                 seed: int, shuffle: bool, start_step: int, total_steps: int):
        self.n, self.b, self.accum, self.world, self.rank = num_records, batch_size, grad_accum, world, rank
        self.seed, self.shuffle, self.start, self.total = seed, shuffle, start_step, total_steps
        self.global_batch = world * grad_accum * batch_size
        self.steps_per_epoch = num_records // self.global_batch

    def order(self, epoch: int) -> torch.Tensor:
        if getattr(self, "_cached", (None,))[0] != epoch:
            perm = (torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
                    if self.shuffle else torch.arange(self.n))
            self._cached = (epoch, perm)
        return self._cached[1]

    def step_indices(self, step: int) -> torch.Tensor:
        """[grad_accum, batch_size] record indices of this process for one optimizer step."""
        epoch, k = divmod(step, self.steps_per_epoch)
        chunk = self.order(epoch)[k * self.global_batch:(k + 1) * self.global_batch]
        return chunk.view(self.accum, self.world, self.b)[:, self.rank, :]

    def __iter__(self):
        for step in range(self.start, self.total):
            for micro in self.step_indices(step):
                yield micro.tolist()

    def __len__(self):
        return (self.total - self.start) * self.accum
