"""Run a model over a data file in the training format and measure it: loss on the assistant tokens,
the tokens it would predict there, and (for awaker models) the routing of every record.

Reading, checking and encoding are training's own (train/data.py): both record layouts (`messages` +
`images` and `conversations` + `image`), an optional `task` per record, a bad record reported as one
`file:line: reason` error, and labels on the assistant tokens (content and its <|im_end|>), so a data
pass measures exactly what training optimises.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import AwakerError
from ..train import data as train_data
from ..train.data import IGNORE_INDEX, Encoder, Record, collate

__all__ = ["DataPass", "Record", "encode", "load_processor", "read_records", "run_data"]


def read_records(path: str | Path, limit: int | None = None, image_root: str | None = None):
    """The records of a `--data` file (the first `limit` only, if given), read and checked as training
    reads them; a bad record stops with `file:line: reason`."""
    records, _ = train_data.read_records([path], limit=limit or None, hint=None, image_root=image_root)
    return records


def encode(processor, records: list[Record], min_pixels: int | None = None, max_pixels: int | None = None) -> dict:
    """Model inputs of a batch of records, as training builds them: right-padded, labels on the
    assistant tokens. No routing spans: an awaker model finds them itself with the same rule. Images at
    the processor's pixel limits (a trained model's processor holds its training's) unless given."""
    encoder = Encoder(processor, cutoff_len=None, span_tokens=None, min_pixels=min_pixels, max_pixels=max_pixels)
    pad_id = processor.tokenizer.pad_token_id
    return collate([encoder(r) for r in records], 0 if pad_id is None else pad_id)


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

    def agreement(self, other: DataPass) -> float:
        """Share of labelled positions where both predict the same token (greedy-token agreement)."""
        return float((self.predictions == other.predictions).float().mean())


@torch.no_grad()
def run_data(model, processor, records: list[Record], *, batch_size: int = 4,
             progress: Callable[[int], None] | None = None, min_pixels: int | None = None,
             max_pixels: int | None = None) -> DataPass:
    """Teacher-forced pass over `records`: loss, predictions and, for awaker models with routers, the
    routing (a stage-1 model has plain LoRAs only: no routing)."""
    awaker = hasattr(model, "awaker_routers") and model.awaker_config.num_routers > 0
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
                batch = {k: v.to(device) for k, v in encode(processor, chunk, min_pixels, max_pixels).items()}
                labels = batch.pop("labels")
                logits = model(**batch).logits[:, :-1].float()
                target = labels[:, 1:]
                mask = target != IGNORE_INDEX
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
