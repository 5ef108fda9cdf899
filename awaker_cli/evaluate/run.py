"""`evaluate`: load a model directory (dense Qwen2-VL or awaker LoRA-MoE), answer every sample of a
data file greedily in batches, score the answers, and optionally write the predictions."""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from ..errors import AwakerError
from ..synth.tasks import format_ok
from .data import Sample, load_samples
from .generation import generate_answers, prepare
from .metrics import exact_match, routing_stats, score


def load_for_eval(model_dir: str | Path, device: str | None = None):
    """(model, processor, kind): an awaker directory (awaker_config.json) loads with its adapters and
    routers, anything else as a plain Qwen2-VL."""
    import torch
    from transformers import AutoProcessor

    from ..model import load_base, load_model
    from ..model.config import CONFIG_NAME

    path = Path(model_dir)
    if (path / CONFIG_NAME).is_file():
        model, kind = load_model(path, dtype=torch.float32, device=device), "awaker"
    else:
        model, kind = load_base(path, dtype=torch.float32, device=device)[0], "dense"
    try:
        processor = AutoProcessor.from_pretrained(path)
    except Exception as e:  # transformers raises many types here; any of them means no usable processor
        raise AwakerError(f"{path}: the processor files do not load ({type(e).__name__}: {e})")
    return model.eval(), processor, kind


def _open_images(sample: Sample) -> list[Image.Image]:
    try:
        return [Image.open(p).convert("RGB") for p in sample.images]
    except OSError as e:
        raise AwakerError(f"sample {sample.index}: cannot read image ({e})")


def evaluate_model(model, processor, samples: Sequence[Sample], *, batch_size: int = 16,
                   max_new_tokens: int = 32, progress: Callable[[int], None] | None = None) -> tuple[dict, list[dict]]:
    """Score `model` on `samples`; returns (metrics, predictions). Works on an in-memory model, so the
    demo and the benchmark can evaluate what they just trained without saving it first."""
    if batch_size < 1:
        raise AwakerError("--batch-size must be at least 1")
    # A stage-I awaker model has plain LoRAs only: no routers, nothing to report about routing.
    moe = hasattr(model, "awaker_state") and bool(model.awaker_config.moe_targets)
    predictions, routes = [], []
    for first in range(0, len(samples), batch_size):
        chunk = samples[first:first + batch_size]
        inputs = prepare(processor, [s.prompt for s in chunk], [_open_images(s) for s in chunk])
        answers = generate_answers(model, processor, inputs, max_new_tokens)
        if moe:  # the prefill routed each sequence once: top-1 expert per router
            routes += model.awaker_state.current.expert_ids[:, :, 0].tolist()
        predictions += answers
        if progress:
            progress(len(chunk))
    tasks = [s.task for s in samples]
    metrics = score(tasks, [s.answer for s in samples], predictions)
    if moe:
        metrics["routing"] = routing_stats(tasks, routes, model.awaker_config.num_experts)
    rows = []
    for i, (s, p) in enumerate(zip(samples, predictions)):
        row = {"index": s.index, "task": s.task, "question": s.question, "answer": s.answer, "prediction": p,
               "exact": exact_match(p, s.answer), "format_ok": format_ok(s.task, p)}
        if moe:
            row["experts"] = routes[i]
        rows.append(row)
    return metrics, rows


def evaluate(model_dir: str | Path, data_file: str | Path, *, batch_size: int = 16, max_new_tokens: int = 32,
             predictions: str | Path | None = None, limit: int | None = None, device: str | None = None,
             progress: Callable[[int], None] | None = None) -> dict:
    """Evaluate a model directory on a data file (training data format). Returns the metrics dict;
    `predictions` writes one JSON line per sample (index, task, question, answer, prediction, ...)."""
    samples = load_samples(data_file, limit)  # bad data fails before the model loads
    model, processor, kind = load_for_eval(model_dir, device)
    metrics, rows = evaluate_model(model, processor, samples, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, progress=progress)
    if predictions:
        out = Path(predictions)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".partial")  # never a half-written predictions file
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, out)
    return {"model": str(model_dir), "kind": kind, "data": str(data_file), **metrics}
