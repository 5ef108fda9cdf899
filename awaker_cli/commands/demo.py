"""`awaker demo [OUT]`: the whole pipeline on the shipped tiny model, in minutes on a laptop CPU."""
from __future__ import annotations

from pathlib import Path

import typer

from ..cli import app, print_json
from ..errors import AwakerError


@app.command()
def demo(
    out: Path = typer.Argument(Path("demo-out"), help="Directory for everything the demo makes."),
    quick: bool = typer.Option(False, "--quick", help="A toy-sized run (a few records and steps) that only "
                                                      "shows every stage working; for CI."),
    seed: int = typer.Option(0, help="Seed of the data and of training."),
    threads: int = typer.Option(1, help="CPU threads for torch (1 is fastest for this tiny model)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it holds an earlier demo."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON (no progress display)."),
):
    """Run the whole pipeline on the tiny pretrained Qwen2-VL shipped with awaker, on the CPU in about
    five minutes: synthetic data with four task families whose answer formats conflict → stage 1 (one
    plain LoRA) → stage 2 (LoRA-MoE started from it, routers learn) → stage 3 (gates frozen) → eval
    (the stage-1 LoRA vs the LoRA-MoE per task) → prune (drop the least used expert) → export nf4 →
    one chat answer about a held-out image with its routing. Everything is written to OUT; the stage
    directories are ordinary `awaker train` outputs (recipes: demo-stage1, demo-stage2, demo-stage3)."""
    from ..demo import run_demo

    if threads < 1:
        raise AwakerError("--threads must be at least 1")
    summary = run_demo(out, quick=quick, seed=seed, force=force, show=not json_out, threads=threads)
    if json_out:
        print_json(summary)
