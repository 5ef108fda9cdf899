"""Rich tables of evaluation results: one model's report, and several models side by side (the demo's
dense LoRA vs LoRA-MoE table)."""
from __future__ import annotations

from rich.table import Table


def pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def report_table(result: dict) -> Table:
    """Per task: n, exact match, format compliance, and for a LoRA-MoE model each expert's share."""
    table = Table(title=f"{result['model']} ({result['kind']}) on {result['data']}")
    for name, justify in (("task", "left"), ("n", "right"), ("exact %", "right"), ("format %", "right")):
        table.add_column(name, justify=justify)
    routing = result.get("routing")
    if routing:
        table.add_column("expert shares % (all routers)")
    for task, row in result["tasks"].items():
        cells = [task, str(row["n"]), pct(row["exact_match"]), pct(row["format"])]
        if routing:
            cells.append(" ".join(f"{100 * f:3.0f}" for f in routing["histogram"][task]))
        table.add_row(*cells)
    macro = result["macro"]
    table.add_row("[bold]macro", str(result["n"]), f"[bold]{pct(macro['exact_match'])}", pct(macro["format"]),
                  *([""] if routing else []))
    if routing:
        table.caption = (f"routing purity {pct(routing['purity'])}% "
                         f"(one expert for everything: {pct(routing['chance'])}%)")
    return table


def comparison_table(results: dict[str, dict], title: str = "exact match % per task") -> Table:
    """Models side by side: one column per model (name -> evaluate() result), one row per task."""
    table = Table(title=title)
    table.add_column("task")
    for name in results:
        table.add_column(name, justify="right")
    tasks = list(dict.fromkeys(t for r in results.values() for t in r["tasks"]))
    for task in tasks:
        table.add_row(task, *(pct(r["tasks"][task]["exact_match"]) if task in r["tasks"] else "-"
                              for r in results.values()))
    table.add_row("[bold]macro", *(f"[bold]{pct(r['macro']['exact_match'])}" for r in results.values()))
    purities = [r.get("routing", {}).get("purity") for r in results.values()]
    if any(p is not None for p in purities):
        table.add_row("routing purity", *(pct(p) for p in purities))
    return table
