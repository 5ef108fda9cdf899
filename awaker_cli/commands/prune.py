"""`awaker prune MODEL OUT`: drop little-used experts and/or reduce the LoRA rank."""
from __future__ import annotations

import functools
from pathlib import Path

import typer

from ..cli import DEFAULT_MAX_SHARD_SIZE, app, print_json
from ..progress import progress_bar, stderr


@app.command()
def prune(
    model: str = typer.Argument(..., help="An awaker model directory (full precision, not an export)."),
    out: Path = typer.Argument(..., help="Output directory (must not exist, or be empty; never MODEL itself)."),
    data: Path = typer.Option(None, "--data", help="A data file (training format): expert usage is measured on "
                                                   "it, and the loss before and after is reported."),
    min_share: float = typer.Option(None, "--min-share", help="Remove experts chosen in less than this share of "
                                                              "router decisions on --data, e.g. 0.05."),
    keep: int = typer.Option(None, "--keep", help="Keep only the N most used experts on --data."),
    rank: int = typer.Option(None, "--rank", help="Reduce every LoRA to this rank by SVD (alpha follows, so the "
                                                  "scaling is unchanged)."),
    batch_size: int = typer.Option(4, min=1, help="Records per forward pass on --data."),
    limit: int = typer.Option(None, help="Use only the first N records of --data."),
    max_shard_size: str = typer.Option(DEFAULT_MAX_SHARD_SIZE, help="Largest shard, in bytes or e.g. 2GB."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Measure and print what would be removed; write nothing."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    full: bool = typer.Option(False, "--full", help="From an adapter-only MODEL: write a complete directory (a "
                                                    "copy of the base too) instead of adapters on the same base."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Make a LoRA-MoE model smaller: remove experts the data rarely routes to (their adapter slots and
    router rows) and/or cut the LoRA rank by SVD, reporting the energy kept and the loss change."""
    from ..checkpoint import parse_size
    from ..ops.prune import prune as run_prune

    r = run_prune(model, out, data=data, min_share=min_share, keep=keep, rank=rank, batch_size=batch_size,
                  limit=limit, force=force, dry_run=dry_run, max_shard_size=parse_size(max_shard_size), full=full,
                  bar=functools.partial(progress_bar, enabled=not json_out))
    if json_out:
        return print_json(r)
    c = r["awaker_config"]
    lines = [f"{'would write' if dry_run else 'wrote'} {out}: {c['num_experts']} routed experts, rank {c['rank']}"]
    if "usage" in r:
        lines.append(f"usage per expert: {', '.join(f'e{i} {u:.1%}' for i, u in enumerate(r['usage']))}; "
                     f"removed {r['removed_experts'] or 'none'}")
    if "energy_kept" in r:
        lines.append(f"SVD energy kept: min {r['energy_kept']['min']:.2%}, mean {r['energy_kept']['mean']:.2%}")
    if "loss_after" in r:
        lines.append(f"loss on data: {r['loss_before']:.4f} -> {r['loss_after']:.4f} ({r['loss_change']:+.4f}); "
                     f"same next token {r['token_agreement']:.1%}")
    elif "loss_before" in r:
        lines.append(f"loss on data: {r['loss_before']:.4f}")
    stderr.print("\n".join(lines))
