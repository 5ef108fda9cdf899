"""`awaker stats MODEL --data FILE`: how a LoRA-MoE model routes a data file."""
from __future__ import annotations

import functools
from pathlib import Path

import typer
from rich.table import Table

from ..cli import app, print_json
from ..progress import progress_bar, stderr
from .options import ImageRoot, MaxPixels, MinPixels


@app.command()
def stats(
    model: str = typer.Argument(..., help="An awaker model directory."),
    data: Path = typer.Option(..., "--data", help="A data file in a training layout (JSON/JSONL with messages "
                                                  "+ images, or conversations + image; optional task field)."),
    batch_size: int = typer.Option(4, min=1, help="Records per forward pass."),
    limit: int = typer.Option(None, help="Use only the first N records."),
    min_pixels: MinPixels = None,
    max_pixels: MaxPixels = None,
    image_root: ImageRoot = None,
    plot: Path = typer.Option(None, "--plot", help="Also draw the routing as a heatmap to this PNG: the share "
                                                  "of the records each expert gets, per router and layer."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --plot file (one awaker drew)."),
    json_out: bool = typer.Option(False, "--json", help="Print the statistics as JSON."),
):
    """Routing statistics: per router and per task, the share of records each expert gets, the mean
    probability p of the chosen expert, and the router entropy (nats; log E is uniform)."""
    from ..ops.stats import stats as run_stats

    s = run_stats(model, data, batch_size=batch_size, limit=limit,
                  bar=functools.partial(progress_bar, enabled=not json_out), min_pixels=min_pixels,
                  max_pixels=max_pixels, image_root=image_root, plot=plot, force=force)
    if json_out:
        return print_json(s)
    E = s["experts"]
    table = Table(title=f"routing of {s['records']} records (loss {s['loss']:.4f}, top-{s['top_k']}, "
                        f"max entropy {s['max_entropy']:.3f})")
    table.add_column("router")
    for e in range(E):
        table.add_column(f"e{e}", justify="right")
    table.add_column("mean p", justify="right")
    table.add_column("entropy", justify="right")

    def row(name, d):
        table.add_row(name, *[f"{x:.0%}" for x in d["share"]], f"{d['mean_p']:.3f}", f"{d.get('entropy', 0):.3f}")

    for r in s["routers"]:
        row(r["name"], r)
    table.add_section()
    row("all routers", s["overall"])
    for task, d in s.get("tasks", {}).items():
        row(f"task {task} ({d['records']})", d)
    stderr.print(table)
    if plot is not None:
        stderr.print(f"[green]wrote[/] {plot}")
