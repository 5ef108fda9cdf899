"""`awaker synth OUT`: the synthetic multi-task dataset (train.jsonl, test.jsonl, img/)."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from ..cli import app, print_json
from ..progress import progress_bar, stderr


MAX_RECORDS = 10_000_000  # a 112×112 PNG each: about 10 GB at most, not a typo's 1e13


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Directory to write train.jsonl, test.jsonl and img/ to."),
    train: int = typer.Option(800, "--train", min=0, max=MAX_RECORDS, help="Training records (one image each)."),
    test: int = typer.Option(160, "--test", min=0, max=MAX_RECORDS,
                             help="Test records, from a seed stream disjoint from train's."),
    seed: int = typer.Option(0, help="Dataset seed: the same seed writes the same bytes."),
    tasks: str = typer.Option("", help="Comma list of tasks (default all eight): color-word, color-json, "
                                       "count-numeral, count-word, ocr-numeral, ocr-word, caption-sentence, caption-tags."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Write synthetic images (1–5 shapes of one colour and a digit) with questions from four task
    families whose answer formats conflict: colour (red vs {"color": "RED"}), count (3 vs three),
    digit (7 vs seven), caption (a sentence vs comma tags). The style is cued in the prompt
    ("Reply in JSON."). Records are in the training data format, with a `task` field."""
    from ..synth import write_dataset

    names = [t.strip() for t in tasks.split(",") if t.strip()] or None
    with progress_bar("synth", train + test, unit="records", enabled=not json_out) as advance:
        result = write_dataset(out, train, test, seed, tasks=names, force=force, progress=advance)
    if json_out:
        return print_json(result)
    stderr.print(f"[green]wrote[/] {escape(str(result['train']))} ({train} records) and {escape(str(result['test']))} ({test} records)")
