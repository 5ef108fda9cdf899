"""Training data: every record of the sources checked up front in one linear pass (only an index is
kept), decoded lazily, encoded with the model's own chat template, labels on assistant tokens only, and
the routing span of every sample.

Sources and layouts: train/sources.py (JSON/JSONL files, Hugging Face datasets, LLaMA-Factory's
dataset_info.json; messages, conversations/sharegpt, alpaca, content lists). Image paths are relative to
the data file's directory (or data.image_root; a registry's dataset_dir). One `<image>` placeholder per
image, in user turns only. An optional `task` string labels the record (stats and eval report per task).

A bad record stops the run with `file:line: reason`, or is skipped and counted with
data.skip_bad_records: what the index pass finds (structure, roles, placeholders, missing or unreadable
image headers) before step 1, what only decoding finds (a truncated image, images needing more than
cutoff_len tokens, an answer cut away by cutoff_len) in the loader, where the sample is replaced by the
next usable record and the skip counted in metrics.jsonl. A JSON array that is not valid JSON cannot be
resynchronised: that always stops the run.

This is the one reader of chat data: `--data` files of stats, prune, merge, export (ops/records.py) and
eval (evaluate/data.py) and `awaker data inspect` are read and checked here too.
"""
from __future__ import annotations

import bisect
import io
import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import AwakerError
from ..model.routing import SpanTokens, routing_spans
from .sources import (IMAGE_PLACEHOLDER, BadRecord, FileSource, HFSource, ImageBytes, Record, Schema,
                      build_record, is_hf_source, iter_file, registry_sources)

__all__ = ["IGNORE_INDEX", "IMAGE_PLACEHOLDER", "BadRecord", "DataStats", "Encoder", "ImageBytes", "Record",
           "RecordDataset", "RecordIndex", "StepBatches", "chat_messages", "collate", "read_records",
           "record_image_settings"]

IGNORE_INDEX = -100


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

    def skip_line(self) -> str:
        return ", ".join(f"{reason} ({n})" for reason, n in self.reasons.most_common())


class RecordIndex(Sequence):
    """The usable records of all sources, read back from their files (or datasets rows) on access.

    Pickles small (offsets only), so every loader worker decodes its own records. `index[i]` raises
    AwakerError (`file:line: reason`) for a record that no longer reads; `get(i)` raises BadRecord."""

    def __init__(self, parts: list):
        self.parts = [p for p in parts if len(p)]
        self.starts, n = [], 0
        for p in self.parts:
            self.starts.append(n)
            n += len(p)
        self.n = n

    def __len__(self):
        return self.n

    def locate(self, i: int):
        if not -self.n <= i < self.n:
            raise IndexError(i)
        i %= self.n
        k = bisect.bisect_right(self.starts, i) - 1
        return self.parts[k], i - self.starts[k]

    def where(self, i: int) -> str:
        part, j = self.locate(i)
        return f"{part.path}:row {part.rows[j]}" if isinstance(part, HFSource) else f"{part.path}:{part.lines[j]}"

    def get(self, i: int) -> Record:
        part, j = self.locate(i)
        return part.record(j)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self.n))]
        try:
            return self.get(i)
        except BadRecord as e:
            raise AwakerError(f"{self.where(i)}: {e}")


SKIP_HINT = "set data.skip_bad_records=true to skip such records"


def data_sources(files: list[str | Path], *, fmt: str = "auto", image_root: str | None = None,
                 dataset: str | list[str] | None = None, dataset_dir: str | None = None) -> list[tuple]:
    """(path, schema, image base) of every source: data.train files and data.dataset registry entries."""
    out = [(Path(f), Schema(fmt), image_root) for f in files]
    if dataset:
        folder = dataset_dir or "data"
        out += [(f, schema, image_root or str(Path(folder).resolve())) for f, schema in registry_sources(dataset, folder)]
    return out


def read_records(files: list[str | Path], *, fmt: str = "auto", image_root: str | None = None,
                 skip_bad: bool = False, limit: int | None = None, hint: str | None = SKIP_HINT,
                 dataset: str | list[str] | None = None, dataset_dir: str | None = None,
                 progress=None) -> tuple[RecordIndex, DataStats]:
    """Every record of every source checked (structure, roles, placeholders, image headers), in one
    linear pass; what is kept is an index (RecordIndex), not the records.

    limit: stop after that many usable records (the rest of the data is not read).
    hint: appended in parentheses to a bad record's error (None for commands without a skip option).
    progress: called with the number of bytes (files) or rows (datasets) done, as the pass goes.
    """
    stats = DataStats()
    parts, kept = [], 0
    headers: dict = {}  # image path -> header problem: each distinct image is opened once
    sources = data_sources(files, fmt=fmt, image_root=image_root, dataset=dataset, dataset_dir=dataset_dir)
    for path, schema, root in sources:
        if limit is not None and kept >= limit:
            break
        stats.files.append(str(path))
        if not path.exists():
            raise AwakerError(f"{path}: data file not found")
        base = str(Path(root) if root else path.resolve().parent)
        hf = is_hf_source(path)
        part = (HFSource if hf else FileSource)(path, base, schema)
        raw = part.iter_raw() if hf else ((o, n, line, obj) for o, n, line, obj in iter_file(path))
        for item in raw:
            if limit is not None and kept >= limit:
                break
            if hf:
                row, obj = item
                where = f"{path}:row {row}"
            else:
                offset, size, line, obj = item
                where = f"{path}:{line}"
            try:
                if isinstance(obj, BadRecord):
                    raise obj
                # datasets rows: image bytes are checked when decoded, not read twice here
                rec = build_record(obj, schema, base, path, row if hf else line, row=hf,
                                   check_header=None if hf else headers)
            except BadRecord as e:
                if not skip_bad:
                    raise AwakerError(f"{where}: {e}" + (f" ({hint})" if hint else ""))
                stats.skipped += 1
                stats.reasons[e.kind] += 1
                continue
            if hf:
                part.add(row)
            else:
                part.add(offset, size, line)
                if progress:
                    progress(offset + size)
            stats.layouts[rec.layout] += 1
            kept += 1
        parts.append(part)
    index = RecordIndex(parts)
    stats.records = len(index)
    if not len(index):
        names = ", ".join(str(p) for p, _, _ in sources) or "(no data files)"
        raise AwakerError(f"no usable records in {names}" + (f" ({stats.skipped} skipped)" if stats.skipped else ""))
    return index, stats


def record_image_settings(directory: Path, min_pixels: int | None, max_pixels: int | None):
    """Write the pixel limits a model was trained with into its processor config, so every command
    that loads the directory's processor (stats, prune, merge, export, eval, chat) sees images as
    training saw them."""
    if min_pixels is None and max_pixels is None:
        return
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = Path(directory) / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        targets = [data[k] for k in ("image_processor", "video_processor") if isinstance(data.get(k), dict)]
        if name == "preprocessor_config.json" or not targets:
            targets = [data]
        for ip in targets:
            size = dict(ip.get("size") or {})
            if min_pixels is not None:
                size["shortest_edge"] = min_pixels
                if "min_pixels" in ip:
                    ip["min_pixels"] = min_pixels
            if max_pixels is not None:
                size["longest_edge"] = max_pixels
                if "max_pixels" in ip:
                    ip["max_pixels"] = max_pixels
            ip["size"] = size
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


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
            return self.encode(rec)
        except BadRecord as e:
            raise AwakerError(f"{rec.where}: {e}")

    def encode(self, rec: Record, info: dict | None = None) -> dict:
        """The sample, or BadRecord. info: filled with what `awaker data inspect` shows (the length
        before cutoff_len, image sizes before and after resizing, image tokens), also for a record
        that cutoff_len then rejects."""
        from PIL import Image

        pieces = self.pieces(rec)
        pixel_values = grid = None
        counts: list[int] = []
        if rec.images:
            images = []
            for p in rec.images:
                try:
                    with Image.open(io.BytesIO(p.data) if isinstance(p, ImageBytes) else p) as im:
                        images.append(im.convert("RGB"))  # decodes it all: a truncated file fails here
                except (OSError, SyntaxError, ValueError) as e:  # PIL raises all three for broken files
                    raise BadRecord(f"cannot decode image {p} ({e})", "image does not decode")
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
        if info is not None:
            patch = self.processor.image_processor.patch_size
            info.update(length=len(ids), labels=sum(1 for t in labels[1:] if t != IGNORE_INDEX), image_tokens=counts,
                        image_sizes=[list(im.size) for im in images] if rec.images else [],
                        resized=[[int(g[2]) * patch, int(g[1]) * patch] for g in grid] if rec.images else [])
        if queue or sum(1 for t in ids if t == self.image_token_id) != n_image_tokens:
            raise BadRecord("the image tokens do not match the images (check the <image> placeholders)")
        if self.cutoff_len is not None and len(ids) > self.cutoff_len:
            kept = sum(1 for t in ids[: self.cutoff_len] if t == self.image_token_id)
            if kept != n_image_tokens:
                raise BadRecord(f"its images need more than data.cutoff_len={self.cutoff_len} tokens "
                                "(raise cutoff_len or lower data.max_pixels)", "images exceed cutoff_len")
            ids, labels = ids[: self.cutoff_len], labels[: self.cutoff_len]
            # labels[0] is never a target (labels are shifted by one): no token left would train nothing
            if all(t == IGNORE_INDEX for t in labels[1:]):
                raise BadRecord(f"its first answer starts after data.cutoff_len={self.cutoff_len} tokens, so "
                                "nothing of it would be trained (raise cutoff_len)", "answer beyond cutoff_len")
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
    if "skipped" in samples[0]:
        batch["skipped"] = [x for s in samples for x in s["skipped"]]
    return batch


MAX_CONSECUTIVE_BAD = 100


class RecordSubset(RecordIndex):
    """Some records of a RecordIndex (positions in it), read back the same way."""

    def __init__(self, index: RecordIndex, positions: list[int]):
        self.index, self.positions, self.n = index, list(positions), len(positions)

    def locate(self, i: int):
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self.index.locate(self.positions[i % self.n])


def hold_out(records: RecordIndex, size: float, seed: int) -> tuple[RecordSubset, RecordSubset]:
    """(train, val): `size` records (a fraction below 1, or a count) drawn with `seed` go to val; the same
    ones on every run of a recipe, so a resumed run trains on the same records."""
    n = len(records)
    k = round(size * n) if size < 1 else int(size)
    if not 1 <= k < n:
        raise AwakerError(f"data.val_size {size:g}: holds out {k} of {n} usable records; it must leave at least "
                          "one record on each side")
    val = sorted(random.Random(seed).sample(range(n), k))
    held = set(val)
    return RecordSubset(records, [i for i in range(n) if i not in held]), RecordSubset(records, val)


class RecordDataset(torch.utils.data.Dataset):
    """Samples of a RecordIndex, decoded and encoded on access (in the loader workers).

    skip_bad: a record that fails only now (an image that does not decode, images or answer beyond
    cutoff_len) is replaced by the next usable record, so the step keeps its size and stays the same
    on resume; the sample carries `skipped`, [(where, kind)], for the loop to count and report."""

    def __init__(self, records, encoder: Encoder, skip_bad: bool = False, hint: str | None = SKIP_HINT):
        self.records, self.encoder, self.skip_bad, self.hint = records, encoder, skip_bad, hint

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        skipped = []
        for k in range(MAX_CONSECUTIVE_BAD):
            j = (i + k) % len(self.records)
            where = self.records.where(j) if isinstance(self.records, RecordIndex) else None
            try:
                rec = self.records.get(j) if isinstance(self.records, RecordIndex) else self.records[j]
                where = rec.where
                sample = self.encoder.encode(rec)
            except BadRecord as e:
                if not self.skip_bad:
                    raise AwakerError(f"{where}: {e}" + (f" ({self.hint})" if self.hint else ""))
                skipped.append((where, e.kind))
                continue
            sample["skipped"] = skipped
            return sample
        raise AwakerError(f"{MAX_CONSECUTIVE_BAD} records in a row fail to decode (from {skipped[0][0]}: "
                          f"{skipped[0][1]}); check the data")


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
