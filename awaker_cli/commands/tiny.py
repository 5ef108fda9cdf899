"""`awaker make-tiny OUT`: a tiny random checkpoint of a model family to try every command on, offline."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from ..cli import app
from ..errors import AwakerError
from ..progress import stderr


@app.command("make-tiny")
def make_tiny(
    out: Path = typer.Argument(..., help="Directory to write the tiny checkpoint to."),
    family: str = typer.Option("qwen2_vl", help="Model family: qwen2_vl, qwen2_5_vl or qwen3_vl."),
    layout: str = typer.Option("hub", help="Key layout: hub (model.layers.*, visual.*) or v5 "
                                           "(transformers-5 names: model.language_model.*, model.visual.*)."),
    max_shard_size: str = typer.Option("", help="Shard the weights (e.g. 200KB); default one file."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
):
    """Write a tiny random Qwen2-VL, Qwen2.5-VL or Qwen3-VL (real transformers classes, tokenizer with
    Qwen's special tokens, chat template, the family's processor). Its weights are random: use it to try
    the commands, not to chat."""
    from ..checkpoint import atomic_output_dir, parse_size
    from ..model.families import family as get_family
    from ..tiny import build_tiny_base

    fam = get_family(family)

    if layout not in ("hub", "v5"):
        raise AwakerError(f"--layout must be hub or v5, not {layout!r}")
    shard = parse_size(max_shard_size) if max_shard_size else None
    with atomic_output_dir(out, force) as tmp:
        build_tiny_base(tmp, layout=layout, max_shard_size=shard, seed=seed, family=fam.name)
    stderr.print(f"[green]wrote[/] {escape(str(out))} (tiny random {fam.label}, {layout} layout)")
