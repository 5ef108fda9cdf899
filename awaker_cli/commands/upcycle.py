"""`awaker upcycle BASE OUT`: dense Qwen-VL -> LoRA-MoE."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from ..cli import DEFAULT_MAX_SHARD_SIZE, app, print_json
from ..errors import AwakerError
from ..progress import print_rows, progress_bar, stderr

MAX_EXPERTS = 64  # more needs --yes: a typo (--experts 1000000) must not quietly write gigabytes


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@app.command()
def upcycle(
    base: str = typer.Argument(..., help="Dense Qwen2-VL, Qwen2.5-VL or Qwen3-VL directory (or a hub id already "
                                         "in the local cache)."),
    out: Path = typer.Argument(..., help="Output directory for the awaker model (must not exist, or be empty)."),
    experts: int = typer.Option(4, help="Routed LoRA experts per MoE linear."),
    rank: int = typer.Option(256, help="LoRA rank of every adapter (experts, global expert, q/k/v)."),
    alpha: float = typer.Option(512.0, help="LoRA alpha; the adapter output is scaled by alpha/rank."),
    dropout: float = typer.Option(0.05, help="LoRA dropout used in training."),
    top_k: int = typer.Option(1, "--top-k", help="Experts each sequence is routed to."),
    global_expert: bool = typer.Option(True, "--global-expert/--no-global-expert",
                                       help="Add the always-on global expert to every MoE linear."),
    lora_targets: str = typer.Option("q_proj,k_proj,v_proj", help="Linears that get a plain LoRA (comma list)."),
    moe_targets: str = typer.Option("o_proj,gate_proj,up_proj,down_proj",
                                    help="Linears that get routed experts (comma list). up/down share gate's router."),
    combine: str = typer.Option("release", help="release: p²·expert + (1−p)·global (as the public release); "
                                                "convex: p·expert + (1−p)·global."),
    routing_span: str = typer.Option("prompt", help="What each router averages: prompt (the prompt span, as the "
                                                    "release), prompt-text (the same without its image tokens) "
                                                    "or all (every token)."),
    seed: int = typer.Option(0, help="Seed for the adapters' random initialisation."),
    max_shard_size: str = typer.Option(DEFAULT_MAX_SHARD_SIZE, help="Largest shard, in bytes or e.g. 2GB."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and write nothing."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it is an earlier awaker output."),
    adapter_only: bool = typer.Option(False, "--adapter-only",
                                      help="Write the adapters and routers alone, with a record of BASE (its path, "
                                           "hub id and a hash of its tensors) instead of a copy of it."),
    yes: bool = typer.Option(False, "--yes", help=f"Write even a plan with more than {MAX_EXPERTS} experts or "
                                                  "adapters larger than the base."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Turn a dense Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint into LoRA-MoE form.

    The base tensors are copied bit for bit; q/k/v get a plain LoRA and o/gate/up/down get routed
    experts plus a global expert, all with B = 0, so the new model computes exactly what the base does.
    """
    from ..checkpoint import check_free_space, check_output_dir, parse_size
    from ..model.config import AwakerConfig
    from ..ops.upcycle import plan_upcycle, run_upcycle

    cfg = AwakerConfig(num_experts=experts, rank=rank, alpha=alpha, dropout=dropout, top_k=top_k,
                       global_expert=global_expert, lora_targets=_names(lora_targets),
                       moe_targets=_names(moe_targets), combine=combine,
                       routing_span=routing_span).with_moe_targets_only_owners()
    plan = plan_upcycle(base, cfg, parse_size(max_shard_size))
    if dry_run:
        summary = plan.summary()
        return print_json(summary) if json_out else _print_plan(summary)
    check_output_dir(out, force, inputs=[plan.base.path])  # fail before any work, not after the bar starts
    total = (0 if adapter_only else plan.base_bytes) + plan.adapter_bytes
    if not yes and (experts > MAX_EXPERTS or plan.adapter_bytes > plan.base_bytes):
        raise AwakerError(f"this plan adds {plan.adapter_params:,} parameters ({plan.adapter_bytes / 1e9:.2f} GB) with "
                          f"{experts} experts to a {plan.base_bytes / 1e9:.2f} GB base; check it with --dry-run and "
                          "pass --yes if it is what you want")
    check_free_space(out.parent, total, "the upcycled model")
    with progress_bar("upcycle", total, enabled=not json_out) as advance:
        result = run_upcycle(plan, out, force=force, seed=seed, progress=advance, adapter_only=adapter_only)
    if json_out:
        return print_json(result)
    stderr.print(f"[green]wrote[/] {escape(str(out))} ({result['shards']} shard(s), "
                 f"{result['adapter_params']:,} adapter parameters added)")


def _print_plan(s: dict):
    c = s["awaker_config"]
    rows = [
        ("base", s["base"]),
        ("base tensors", f"{s['base_tensors']:,} ({s['base_params']:,} parameters, {s['base_bytes']:,} bytes)"),
        ("adapter tensors", f"{s['adapter_tensors']:,} ({s['adapter_params']:,} parameters, "
                            f"{s['adapter_bytes']:,} bytes, {s['adapter_dtype']})"),
        ("experts", f"{c['num_experts']} routed{' + global' if c['global_expert'] else ''}, top-{c['top_k']}, "
                    f"rank {c['rank']}, alpha {c['alpha']:g}, combine {c['combine']}, span {c['routing_span']}"),
        ("LoRA targets", ", ".join(c["lora_targets"]) or "-"),
        ("MoE targets", ", ".join(c["moe_targets"])),
        ("shards", str(s["shards"])),
        ("total", f"{s['total_bytes']:,} bytes"),
    ]
    print_rows("upcycle plan (nothing written)", rows)
