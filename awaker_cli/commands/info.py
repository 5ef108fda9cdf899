"""`awaker info PATH`: what a model directory holds."""
from __future__ import annotations

import typer
from rich.table import Table

from ..cli import app, print_json
from ..progress import stderr


@app.command()
def info(
    path: str = typer.Argument(..., help="A dense Qwen2-VL / Qwen2.5-VL / Qwen3-VL or an awaker model directory."),
    json_out: bool = typer.Option(False, "--json", help="Print the description as JSON."),
):
    """Show architecture, parameters (total and active per token), experts, routers, dtype, size and files."""
    from ..ops.info import describe

    d = describe(path)
    if json_out:
        return print_json(d)
    table = Table(title=f"{d['path']} ({d['kind']})", show_header=False)
    a, p = d["architecture"], d["parameters"]
    table.add_row("architecture", f"{d['family']} ({a['model_type']}): {a['layers']} layers, hidden {a['hidden_size']}, "
                                  f"MLP {a['intermediate_size']}, {a['attention_heads']} heads / {a['kv_heads']} KV, "
                                  f"vocab {a['vocab_size']}, vision depth {a['vision_depth']}")
    table.add_row("parameters", f"{p['total']:,} total, {p['active_per_token']:,} active per token")
    parts = ", ".join(f"{k} {v:,}" for k, v in p.items() if k not in ("total", "active_per_token"))
    table.add_row("", parts)
    if "awaker" in d:
        w = d["awaker"]
        table.add_row("targets", f"LoRA: {', '.join(w['lora_targets']) or '-'}; MoE: {', '.join(w['moe_targets']) or '-'}")
        if w["moe_targets"]:
            table.add_row("experts", f"{w['experts']} routed{' + global' if w['global_expert'] else ''}, "
                                     f"top-{w['top_k']}, rank {w['rank']}, alpha {w['alpha']:g}, combine {w['combine']}")
            owners = [t for t, o in w["router_owners"].items() if t == o]
            table.add_row("routers", f"{w['routers']} ({', '.join(owners)} per layer), span rule {w['routing_span']}")
        else:
            table.add_row("experts", f"none (plain LoRA of rank {w['rank']}, alpha {w['alpha']:g}; no routers)")
    if "base" in d:
        table.add_row("base", f"adapters only; base {d['base']['path']} (verified: tensor hash "
                              f"{d['base']['tensors_sha256'][:12]}…)")
    table.add_row("dtypes", ", ".join(f"{k} ({v} tensors)" for k, v in d["dtypes"].items()))
    table.add_row("size on disk", f"{d['size_on_disk']:,} bytes in {len(d['shards'])} shard(s)")
    table.add_row("files", ", ".join(d["processor_files"]))
    table.add_row("missing", ", ".join(d["missing_files"]) or "[green]none[/]")
    table.add_row("transformers", f"plain transformers loads {d['transformers_loads']}")
    stderr.print(table)
