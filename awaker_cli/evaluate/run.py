"""`evaluate`: load a model directory (dense Qwen2-VL or awaker LoRA-MoE), answer every sample of a
data file greedily in batches with the generation engine, score the answers, and optionally write the
predictions."""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import AwakerError
from ..synth.tasks import format_ok
from .data import Sample, load_samples
from .generation import answer_samples, eval_engine
from .metrics import exact_match, routing_stats, score

DTYPES = ("auto", "bf16", "fp16", "fp32")


def load_for_eval(model_dir: str | Path, device: str | None = None, dtype: str = "auto"):
    """(model, processor, kind): an awaker directory (awaker_config.json) loads with its adapters and
    routers, anything else as a plain Qwen2-VL. On a GPU by default (`device`: cuda, cpu, or None for
    cuda when one is visible); dtype auto is bf16 on a GPU and fp32 on the CPU."""
    from ..checkpoint import resolve_path
    from ..generate.load import DTYPES as TORCH_DTYPES
    from ..generate.load import load_processor, pick_device
    from ..model import load_base, load_model
    from ..model.config import CONFIG_NAME

    if dtype not in DTYPES:
        raise AwakerError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = resolve_path(str(model_dir))
    processor = load_processor(path)  # a broken directory fails before the weights load
    device = pick_device(device)
    if dtype == "auto":
        dtype = "fp32" if device == "cpu" else "bf16"
    device_map = None if device == "cpu" else device
    if (path / CONFIG_NAME).is_file():
        model, kind = load_model(path, TORCH_DTYPES[dtype], device_map), "awaker"
    else:
        model, kind = load_base(path, TORCH_DTYPES[dtype], device_map)[0], "dense"
    return model.eval(), processor, kind


def evaluate_model(model, processor, samples: Sequence[Sample], *, batch_size: int = 16,
                   max_new_tokens: int = 32, progress: Callable[[int], None] | None = None,
                   min_pixels: int | None = None, max_pixels: int | None = None) -> tuple[dict, list[dict]]:
    """Score `model` on `samples`; returns (metrics, predictions). Works on an in-memory model, so the
    demo and the benchmark can evaluate what they just trained without saving it first; the engine
    prepares the model for inference in place (q/k/v LoRA merged), so do not train it afterwards."""
    if batch_size < 1:
        raise AwakerError("--batch-size must be at least 1")
    # A stage-I awaker model has plain LoRAs only: no routers, nothing to report about routing.
    moe = hasattr(model, "awaker_state") and bool(model.awaker_config.moe_targets)
    engine = eval_engine(model, processor, min_pixels, max_pixels)
    predictions, routes = [], []
    for first in range(0, len(samples), batch_size):
        chunk = samples[first:first + batch_size]
        answers = answer_samples(engine, [s.prompt for s in chunk], [s.images for s in chunk], max_new_tokens)
        if moe:  # each sequence was routed once, at its prefill: top-1 expert per router
            routes += [g.routing.expert_ids[0, :, 0].tolist() for g in answers]
        predictions += [g.text.strip() for g in answers]
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


def check_predictions_path(path: str | Path, inputs) -> None:
    """--predictions names a file to (over)write: not a directory, not the data file or inside the model."""
    from ..checkpoint import check_not_an_input

    path = Path(path)
    if path.is_dir():
        raise AwakerError(f"--predictions {path}: is a directory; give a file name (e.g. {path / 'preds.jsonl'})")
    check_not_an_input(path, inputs)


def evaluate(model_dir: str | Path, data_file: str | Path, *, batch_size: int = 16, max_new_tokens: int = 32,
             predictions: str | Path | None = None, limit: int | None = None, device: str | None = None,
             dtype: str = "auto", progress: Callable[[int], None] | None = None,
             samples: Sequence[Sample] | None = None, min_pixels: int | None = None,
             max_pixels: int | None = None, image_root: str | None = None) -> dict:
    """Evaluate a model directory on a data file (training data format). Returns the metrics dict;
    `predictions` writes one JSON line per sample (index, task, question, answer, prediction, ...).
    samples: the file's samples if the caller already read them (with the same limit)."""
    if predictions:
        check_predictions_path(predictions, [model_dir, data_file])
    if samples is None:
        samples = load_samples(data_file, limit, image_root)  # bad data fails before the model loads
    model, processor, kind = load_for_eval(model_dir, device, dtype)
    metrics, rows = evaluate_model(model, processor, samples, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, progress=progress, min_pixels=min_pixels,
                                   max_pixels=max_pixels)
    if predictions:
        out = Path(predictions)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")  # never a half-written predictions file
        try:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    weights = model.get_input_embeddings().weight  # never quantized: the dtype the model computes in
    return {"model": str(model_dir), "kind": kind, "data": str(data_file), "device": str(weights.device),
            "dtype": str(weights.dtype).removeprefix("torch."), **metrics}
