"""`awaker relink MODEL BASE`: point an adapter-only directory at a moved copy of its base."""
from __future__ import annotations

import functools

import typer
from rich.markup import escape

from ..cli import app, print_json
from ..progress import progress_bar, stderr


@app.command()
def relink(
    model: str = typer.Argument(..., help="An adapter-only awaker directory (one with awaker_base.json)."),
    base: str = typer.Argument(..., help="Where its base model is now: a directory, or a hub id in the local cache."),
    json_out: bool = typer.Option(False, "--json", help="Print the new base record as JSON."),
):
    """Record a new location for the base of an adapter-only directory.

    BASE must hold exactly the tensors the adapters were trained on (it is hashed and compared with the
    recorded hash; a re-sharded copy or the other key layout of the same weights is accepted). Only
    awaker_base.json in MODEL changes. Each stage directory records its base itself: relink each one.
    """
    from ..checkpoint.base_ref import relink as relink_base
    from ..checkpoint.reader import resolve_path

    directory = resolve_path(model)
    record = relink_base(directory, base, bar=functools.partial(progress_bar, enabled=not json_out))
    if json_out:
        return print_json(record)
    stderr.print(f"[green]relinked[/] {escape(str(directory))} to its base {escape(record['path'])} (verified)")
