"""Evaluation samples from a data file in the training format. Reading and checking are training's own
(train/data.py: JSONL or a JSON list, the `messages` + `images` and `conversations` + `image` layouts,
one `file:line: reason` error per bad record); this module only splits a record: its last turn (always
the assistant's) is the reference answer, every turn before it the prompt. `task` is optional ("all"
when absent)."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from ..train.data import ImageBytes, Record, chat_messages, read_records


@dataclass
class Sample:
    index: int
    task: str
    prompt: list[dict]  # chat messages in the processor's format, rendered as training renders them
    question: str  # the last user turn as written in the file
    answer: str
    images: list[Path] = field(default_factory=list)


def sample_from_record(record: Record, index: int) -> Sample:
    """The prompt (every turn before the answer) and the reference answer (the last, assistant turn)."""
    prompt_turns, (_, answer) = record.turns[:-1], record.turns[-1]
    question = next(text for role, text in reversed(prompt_turns) if role == "user")
    images = [_pil(im) if isinstance(im, ImageBytes) else im for im in record.images]
    return Sample(index, record.task or "all", chat_messages(prompt_turns), question, answer, images)


def _pil(im: ImageBytes):
    from PIL import Image

    return Image.open(io.BytesIO(im.data))


def load_samples(path: str | Path, limit: int | None = None, image_root: str | None = None) -> list[Sample]:
    """The first `limit` (default: every) sample of a data file or dataset; image paths are relative to
    the file's directory, or to image_root."""
    records, _ = read_records([path], limit=limit or None, hint=None, image_root=image_root)
    return [sample_from_record(r, i) for i, r in enumerate(records)]
