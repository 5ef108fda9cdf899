"""`awaker convert SRC OUT --base DIR`: the official Awaker2.5-VL release checkpoint -> an awaker directory."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from ..cli import DEFAULT_MAX_SHARD_SIZE, app, print_json
from ..progress import print_rows, progress_bar, stderr


@app.command()
def convert(
    src: Path = typer.Argument(..., help="The release's pytorch_model.bin (or a .safetensors copy of the same "
                                         "state dict)."),
    out: Path = typer.Argument(..., help="Output directory for the awaker model (must not exist, or be empty)."),
    base: str = typer.Option(None, "--base", help="The Qwen2-VL-7B-Instruct directory the release was trained "
                                                 "from: config.json and the tokenizer/processor files come from "
                                                 "it (required)."),
    alpha: float = typer.Option(512.0, help="The release's LoRA alpha; adapters are scaled by alpha/r "
                                            "(r is read from the tensor shapes)."),  # = ops.convert.DEFAULT_ALPHA (tested)
    max_shard_size: str = typer.Option(DEFAULT_MAX_SHARD_SIZE, help="Largest shard, in bytes or e.g. 2GB."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the file and print what would be written; "
                                                          "write nothing."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Import the official Awaker2.5-VL release checkpoint.

    Reads the release's PeftModel state dict (weights only: no pickled code runs; memory-mapped and
    streamed tensor by tensor), stacks its LoRA experts and routers into the awaker layout and writes a
    directory that computes what the release computes (p²·expert + (1−p)·global, top-1).
    """
    from ..checkpoint import check_output_dir, parse_size
    from ..ops.convert import plan_convert, run_convert

    shard_size = parse_size(max_shard_size)
    if not dry_run:
        check_output_dir(out, force, inputs=[src, base])  # fail before any work
    plan = plan_convert(src, base, alpha=alpha, max_shard_size=shard_size)
    if dry_run:
        summary = plan.summary()
        return print_json(summary) if json_out else _print_plan(summary)
    with progress_bar("convert", len(plan.pieces), unit="tensors", enabled=not json_out) as advance:
        result = run_convert(plan, out, force=force, progress=advance)
    if json_out:
        return print_json(result)
    stderr.print(f"[green]wrote[/] {escape(str(out))} ({result['shards']} shard(s); {result['experts']} experts + global, "
                 f"rank {result['rank']}, {result['adapter_params']:,} adapter parameters)")


def _print_plan(s: dict):
    c = s["awaker_config"]
    rows = [
        ("source", f"{s['source']} ({s['source_format']}, {s['source_tensors']:,} tensors)"),
        ("base", s["base"]),
        ("base tensors", f"{s['base_tensors']:,} ({s['base_params']:,} parameters)"),
        ("adapter tensors", f"{s['adapter_tensors']:,} ({s['adapter_params']:,} parameters)"),
        ("experts", f"{c['num_experts']} routed + global, top-{c['top_k']}, rank {c['rank']}, alpha {c['alpha']:g}, "
                    f"combine {c['combine']}"),
        ("routers", f"{s['routers']} (o_proj and gate_proj per layer; up/down reuse gate_proj's)"),
        ("dtypes", ", ".join(s["dtypes"])),
        ("shards", str(s["shards"])),
        ("total", f"{s['total_bytes']:,} bytes"),
    ]
    rows += [("note", n) for n in s["notes"]]
    print_rows("convert plan (nothing written)", rows)
