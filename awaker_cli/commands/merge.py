"""`awaker merge MODEL OUT`: fold the q/k/v LoRA, bake a routing into a dense model, or merge experts."""
from __future__ import annotations

import functools
from pathlib import Path

import typer

from ..cli import DEFAULT_MAX_SHARD_SIZE, app, print_json
from ..progress import progress_bar, stderr


@app.command()
def merge(
    model: str = typer.Argument(..., help="An awaker model directory (full precision, not an export)."),
    out: Path = typer.Argument(..., help="Output directory (must not exist, or be empty; never MODEL itself)."),
    expert: int = typer.Option(None, "--expert", help="Bake a dense model that always uses this routed expert "
                                                      "(0-based) with the global expert."),
    p: float = typer.Option(None, "--p", help="With --expert: the router probability p to bake (0..1)."),
    data: Path = typer.Option(None, "--data", help="A data file (training format). Alone: bake the routing it picks "
                                                   "most. With --expert: bake that expert's mean p on it. "
                                                   "With --experts: calibrate the merged router row on it."),
    experts: str = typer.Option(None, "--experts", help="Merge these routed experts into one, e.g. 1,3."),
    keep_rank_sum: bool = typer.Option(False, "--keep-rank-sum", help="With --experts: keep the merged product "
                                       "exactly (rank grows to n·r; other adapters are zero-padded) instead of "
                                       "an SVD back to rank r."),
    batch_size: int = typer.Option(4, min=1, help="Records per forward pass on --data."),
    limit: int = typer.Option(None, help="Use only the first N records of --data."),
    max_shard_size: str = typer.Option(DEFAULT_MAX_SHARD_SIZE, help="Largest shard, in bytes or e.g. 2GB."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check everything and print what would be written."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    full: bool = typer.Option(False, "--full", help="With --experts from an adapter-only MODEL: write a complete "
                                                    "directory instead of adapters on the same base (a fold or a "
                                                    "bake is always complete)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Merge adapters into weights.

    \b
    awaker merge MODEL OUT                      fold the plain LoRA into the base (stage I: a dense model)
    awaker merge MODEL OUT --expert 2 --p 0.8   plain dense model: expert 2 at p=0.8 + global expert
    awaker merge MODEL OUT --data eval.jsonl    plain dense model with the routing the data picks most
    awaker merge MODEL OUT --experts 1,3        one expert fewer: 1 and 3 merged, their router rows combined
    """
    from ..checkpoint import parse_size
    from ..ops.merge import merge as run_merge

    result = run_merge(model, out, expert=expert, p=p, data=data, experts=experts, keep_rank_sum=keep_rank_sum,
                       batch_size=batch_size, limit=limit, force=force, dry_run=dry_run, full=full,
                       max_shard_size=parse_size(max_shard_size),
                       bar=functools.partial(progress_bar, enabled=not json_out))
    if json_out:
        return print_json(result)
    verb = "would write" if dry_run else "wrote"
    mode = result["mode"]
    if mode == "fold-lora":
        stderr.print(f"{verb} {out}: {result['folded_modules']} LoRA modules folded into the base weights")
    elif mode == "fold-lora-dense":
        stderr.print(f"{verb} {out}: a plain dense model, {result['folded_modules']} LoRA modules folded into its "
                     "weights")
    elif mode == "bake":
        experts_used = sorted({e for r in result["routing"] for e in r["experts"]})
        stderr.print(f"{verb} {out}: a plain dense model with {result['how']} baked in "
                     f"(experts used: {experts_used}, combine {result['combine']})")
    else:
        c = result["awaker_config"]
        line = f"{verb} {out}: experts {result['merged']} merged, {c['num_experts']} routed experts, rank {c['rank']}"
        if "energy_kept" in result:
            line += f"; SVD kept {result['energy_kept']['min']:.1%} of the merged product's energy at worst"
        if "calibration" in result:
            cal = result["calibration"]
            line += (f"; calibrated on {cal['records']} records, {cal['records_moved_to_merged']} that used "
                     "another expert now also pick the merged one")
        stderr.print(line)
