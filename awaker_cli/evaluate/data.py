"""Read evaluation samples from a file in the training data format: JSONL (or a JSON list) of
LLaMA-Factory records `{"messages": [...], "images": [...]}` or LLaVA/Qwen records
`{"image": ..., "conversations": [{"from": "human", "value": ...}, ...]}`. The last assistant turn is
the reference answer; every turn before it is the prompt. `task` is optional ("all" when absent)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AwakerError

IMAGE_TOKEN = "<image>"
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


@dataclass
class Sample:
    index: int
    task: str
    prompt: list[dict]  # chat messages in the processor's format (content: list of image/text items)
    question: str  # the last user turn as written in the file
    answer: str
    images: list[Path] = field(default_factory=list)


def _turns(record: dict, where: str) -> list[tuple[str, str]]:
    if "messages" in record:
        raw, role_key, text_key = record["messages"], "role", "content"
    elif "conversations" in record:
        raw, role_key, text_key = record["conversations"], "from", "value"
    else:
        raise AwakerError(f"{where}: a record needs 'messages' or 'conversations'")
    turns = []
    for turn in raw:
        role = _ROLES.get(str(turn.get(role_key, "")))
        if role is None or not isinstance(turn.get(text_key), str):
            raise AwakerError(f"{where}: a turn needs a role (user/assistant/system) and string content")
        turns.append((role, turn[text_key]))
    return turns


def _content(text: str) -> list[dict]:
    """'<image>What is it?' -> [{"type": "image"}, {"type": "text", "text": "What is it?"}]."""
    items = []
    for i, part in enumerate(text.split(IMAGE_TOKEN)):
        if i:
            items.append({"type": "image"})
        if part:  # kept exactly as written, as LLaMA-Factory's template does
            items.append({"type": "text", "text": part})
    return items


def parse_record(record: dict, index: int, base: Path, where: str) -> Sample:
    turns = _turns(record, where)
    last = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=None)
    if last is None or not any(role == "user" for role, _ in turns[:last]):
        raise AwakerError(f"{where}: a record needs a user turn followed by an assistant answer")
    prompt_turns = turns[:last]
    images = record.get("images", record.get("image", []))
    images = [images] if isinstance(images, str) else list(images)
    placeholders = sum(text.count(IMAGE_TOKEN) for _, text in prompt_turns)
    if placeholders != len(images):
        raise AwakerError(f"{where}: {placeholders} {IMAGE_TOKEN} placeholder(s) in the prompt but "
                          f"{len(images)} image(s)")
    paths = [Path(p) if Path(p).is_absolute() else base / p for p in images]
    for p in paths:
        if not p.is_file():
            raise AwakerError(f"{where}: image {p} not found")
    prompt = [{"role": role, "content": text if role == "system" else _content(text)} for role, text in prompt_turns]
    question = next(text for role, text in reversed(prompt_turns) if role == "user")
    return Sample(index, str(record.get("task") or "all"), prompt, question, turns[last][1], paths)


def load_samples(path: str | Path, limit: int | None = None) -> list[Sample]:
    """Every sample of a JSONL/JSON file; image paths are relative to the file's directory."""
    path = Path(path)
    if not path.is_file():
        raise AwakerError(f"{path}: data file not found")
    text = path.read_text()
    if text.lstrip().startswith("["):
        try:
            records = [(f"{path} record {i}", r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise AwakerError(f"{path}: not valid JSON ({e})")
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise AwakerError(f"{path}:{n}: not valid JSON ({e})")
    if limit is not None:
        records = records[:limit]
    if not records:
        raise AwakerError(f"{path}: no records")
    samples = []
    for i, (where, record) in enumerate(records):
        if not isinstance(record, dict):
            raise AwakerError(f"{where}: a record must be a JSON object")
        samples.append(parse_record(record, i, path.parent, where))
    return samples
