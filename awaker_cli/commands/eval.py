"""`awaker eval MODEL --data FILE`: per-task exact match, format compliance and routing statistics."""
from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.markup import escape

from ..cli import app, print_json
from ..progress import progress_bar, stderr
from .options import ImageRoot, MaxPixels, MinPixels


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="A dense Qwen2-VL / Qwen2.5-VL / Qwen3-VL or an awaker model directory."),
    data: Path = typer.Option(..., "--data", help="JSONL (or JSON list) in the training data format; "
                                                  "the last assistant turn is the reference, `task` is optional."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Samples generated together."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Longest answer generated."),
    limit: int = typer.Option(0, help="Evaluate only the first N records (0: all)."),
    predictions: Path = typer.Option(None, "--predictions", help="Write one JSON line per sample here "
                                                                 "(index, task, question, answer, prediction)."),
    device: str | None = typer.Option(None, "--device", help="cuda or cpu (default: cuda when a GPU is visible)."),
    dtype: str = typer.Option("auto", "--dtype", help="Weights dtype: auto (bf16 on a GPU, fp32 on the CPU), "
                                                     "bf16, fp16 or fp32."),
    min_pixels: MinPixels = None,
    max_pixels: MaxPixels = None,
    image_root: ImageRoot = None,
    json_out: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
):
    """Answer every sample greedily (batched, with the engine `awaker chat` uses) and score the answers
    per task: exact match, format compliance (the answer is in its task's format) and their macro
    averages; for a LoRA-MoE model also the expert histogram per task and routing purity. Runs offline."""
    from ..evaluate import evaluate, load_samples, report_table

    samples = load_samples(data, limit or None, image_root)  # bad data fails before the model loads
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # quantized exports: load-time notices, as in chat
    with progress_bar("eval", len(samples), unit="samples", enabled=not json_out) as advance:
        result = evaluate(model, data, batch_size=batch_size, max_new_tokens=max_new_tokens,
                          predictions=predictions, limit=limit or None, device=device, dtype=dtype,
                          progress=advance, samples=samples, min_pixels=min_pixels, max_pixels=max_pixels)
    if json_out:
        return print_json(result)
    stderr.print(report_table(result))
    if predictions:
        stderr.print(f"[green]wrote[/] {escape(str(predictions))}")
