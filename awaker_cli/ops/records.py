"""Run a model over a data file in the training format and measure it: loss on the assistant tokens,
the tokens it would predict there, and (for awaker models) the routing of every record.

The data format is the training one (LLaMA-Factory style JSONL): one record per line,
`{"messages": [{"role": "user", "content": "<image>What…"}, {"role": "assistant", "content": "…"}],
"images": ["img/1.png"], "task": "count"}`; image paths are relative to the file, one `<image>` per
image, `task` optional. Labels are the assistant tokens (content and its <|im_end|>), as in training.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import AwakerError

IGNORE = -100


@dataclass
class Record:
    messages: list[dict]  # chat-template messages (content as a list of image/text parts)
    images: list[Path]
    task: str | None


def read_records(path: str | Path, limit: int | None = None) -> list[Record]:
    """Parse and check a JSONL (or JSON list) data file; every problem names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise AwakerError(f"{path}: no such data file")
    text = path.read_text()
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise AwakerError(f"{path}: not valid JSON lines ({e})")
    records = []
    for n, row in enumerate(rows[:limit] if limit else rows, 1):
        where = f"{path}: record {n}"
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
            raise AwakerError(f"{where}: needs a 'messages' list")
        images = [path.parent / p for p in row.get("images") or []]
        messages, placeholders = [], 0
        for m in row["messages"]:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise AwakerError(f"{where}: every message needs a role (system/user/assistant) and text content")
            parts = []
            for i, chunk in enumerate(m["content"].split("<image>")):
                if i:
                    parts.append({"type": "image"})
                    placeholders += 1
                if chunk:
                    parts.append({"type": "text", "text": chunk})
            messages.append({"role": m["role"], "content": parts})
        if placeholders != len(images):
            raise AwakerError(f"{where}: {placeholders} <image> placeholder(s) but {len(images)} image(s)")
        if not any(m["role"] == "assistant" for m in messages):
            raise AwakerError(f"{where}: no assistant message to measure")
        for image in images:
            if not image.is_file():
                raise AwakerError(f"{where}: image {image} not found")
        records.append(Record(messages, images, row.get("task")))
    if not records:
        raise AwakerError(f"{path}: no records")
    return records


def assistant_labels(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Labels [B, T]: the token id on assistant turns (after `<|im_start|>assistant\\n`, up to and
    including the turn's <|im_end|>), IGNORE everywhere else."""
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    labels = torch.full_like(input_ids, IGNORE)
    for b, row in enumerate(input_ids.tolist()):
        starts = [i for i, t in enumerate(row) if t == im_start]
        for s in starts:
            end = next((i for i in range(s + 1, len(row)) if row[i] == im_end), len(row) - 1)
            # The role header is the few tokens up to the first newline.
            header = next((j for j in range(s + 1, end) if "\n" in tokenizer.decode(row[s + 1:j + 1])), None)
            if header is not None and tokenizer.decode(row[s + 1:header + 1]).strip() == "assistant":
                labels[b, header + 1:end + 1] = input_ids[b, header + 1:end + 1]
    return labels


def _open_image(path):
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as e:  # missing, unreadable or not an image: the data file's problem, one line
        raise AwakerError(f"{path}: cannot read image ({e})")


def encode(processor, records: list[Record]) -> dict:
    """Processor inputs (left-padded) and labels for a batch of records."""
    texts = [processor.apply_chat_template(r.messages, tokenize=False) for r in records]
    images = [_open_image(p) for r in records for p in r.images]
    processor.tokenizer.padding_side = "left"
    batch = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
    batch["labels"] = assistant_labels(batch["input_ids"], processor.tokenizer)
    return dict(batch)


@dataclass
class DataPass:
    """What one pass over a data file measured (routing fields are None for plain models)."""

    loss: float  # mean cross-entropy per assistant token
    tokens: int
    predictions: torch.Tensor  # [tokens] argmax next token at every labelled position
    tasks: list[str | None]
    expert_ids: torch.Tensor | None = None  # [N, R, k]
    probs: torch.Tensor | None = None  # [N, R, k]
    span_means: torch.Tensor | None = None  # [N, H] fp32, the router input of each record

    def agreement(self, other: "DataPass") -> float:
        """Share of labelled positions where both predict the same token (greedy-token agreement)."""
        return float((self.predictions == other.predictions).float().mean())


@torch.no_grad()
def run_data(model, processor, records: list[Record], *, batch_size: int = 4,
             progress: Callable[[int], None] | None = None) -> DataPass:
    """Teacher-forced pass over `records`: loss, predictions and, for awaker models, the routing."""
    awaker = hasattr(model, "awaker_routers")
    captured: list[torch.Tensor] = []
    hook = model.awaker_routers.register_forward_hook(lambda m, a, out: captured.append(a[0].float().cpu())) \
        if awaker else None
    loss_sum, tokens, preds, ids, probs = 0.0, 0, [], [], []
    device = next(model.parameters()).device
    try:
        with warnings.catch_warnings():
            # bitsandbytes' int8 layers warn on every call that they cast bf16 inputs to fp16
            warnings.filterwarnings("ignore", message=".*inputs will be cast from")
            for start in range(0, len(records), batch_size):
                chunk = records[start:start + batch_size]
                batch = {k: v.to(device) for k, v in encode(processor, chunk).items()}
                labels = batch.pop("labels")
                logits = model(**batch).logits[:, :-1].float()
                target = labels[:, 1:]
                mask = target != IGNORE
                loss_sum += float(F.cross_entropy(logits[mask], target[mask], reduction="sum"))
                tokens += int(mask.sum())
                preds.append(logits.argmax(-1)[mask].cpu())
                if awaker:
                    routing = model.awaker_state.fixed or model.awaker_state.current
                    ids.append(routing.expert_ids.cpu())
                    probs.append(routing.probs.float().cpu())
                if progress:
                    progress(len(chunk))
    finally:
        if hook:
            hook.remove()
    if tokens == 0:
        raise AwakerError("the data has no assistant tokens to measure")
    result = DataPass(loss_sum / tokens, tokens, torch.cat(preds), [r.task for r in records])
    if awaker:
        result.expert_ids, result.probs = torch.cat(ids), torch.cat(probs)
        result.span_means = torch.cat(captured) if captured else None
    return result


def load_processor(path: str | Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)
