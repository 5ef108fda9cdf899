"""Scores from predictions: per-task exact match and format compliance, macro averages, and for
LoRA-MoE models the expert histogram per task and routing purity."""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

from ..synth.tasks import format_ok


def exact_match(prediction: str, answer: str) -> bool:
    """Equal after stripping surrounding whitespace; case and format count (`RED` is not `red`)."""
    return prediction.strip() == answer.strip()


def score(tasks: Sequence[str], answers: Sequence[str], predictions: Sequence[str]) -> dict:
    """{"tasks": {task: {n, exact_match, format}}, "macro": {...}, "micro_exact_match", "n"}.

    format is the fraction of predictions in the task's answer format (None for a task awaker does not
    define, e.g. "all"); macro averages are over tasks, so a small task counts as much as a large one.
    """
    per: dict[str, dict] = defaultdict(lambda: {"n": 0, "exact": 0, "format": 0, "format_known": True})
    for task, answer, prediction in zip(tasks, answers, predictions, strict=True):
        row = per[task]
        row["n"] += 1
        row["exact"] += exact_match(prediction, answer)
        ok = format_ok(task, prediction)
        if ok is None:
            row["format_known"] = False
        else:
            row["format"] += ok
    table = {}
    for task in sorted(per):
        row = per[task]
        table[task] = {"n": row["n"], "exact_match": row["exact"] / row["n"],
                       "format": row["format"] / row["n"] if row["format_known"] else None}
    formats = [r["format"] for r in table.values() if r["format"] is not None]
    n = sum(r["n"] for r in table.values())
    return {
        "n": n,
        "tasks": table,
        "macro": {"exact_match": sum(r["exact_match"] for r in table.values()) / len(table) if table else 0.0,
                  "format": sum(formats) / len(formats) if formats else None},
        "micro_exact_match": sum(per[t]["exact"] for t in per) / n if n else 0.0,
    }


def routing_stats(tasks: Sequence[str], expert_ids: Sequence[Sequence[int]], num_experts: int) -> dict:
    """Routing of N samples by R routers (expert_ids[i][r]: the top-1 expert of sample i at router r).

    histogram: per task, the fraction of its (sample, router) decisions that went to each expert.
    purity: per router, the fraction of samples whose expert's majority task is their own task,
            averaged over routers (1.0 = every expert serves one task; with E experts and T > E
            balanced tasks at most E/T is reachable).
    chance: the purity of sending everything to one expert (the largest task's share), for reference.
    """
    n = len(tasks)
    if n == 0 or not expert_ids:
        return {"histogram": {}, "purity": None, "purity_per_router": [], "chance": None}
    routers = len(expert_ids[0])
    histogram = {}
    for task in sorted(set(tasks)):
        counts = Counter(e for t, row in zip(tasks, expert_ids) if t == task for e in row)
        total = sum(counts.values())
        histogram[task] = [counts.get(e, 0) / total for e in range(num_experts)]
    purity = []
    for r in range(routers):
        by_expert: dict[int, Counter] = defaultdict(Counter)
        for task, row in zip(tasks, expert_ids):
            by_expert[row[r]][task] += 1
        purity.append(sum(c.most_common(1)[0][1] for c in by_expert.values()) / n)
    return {"histogram": histogram, "purity": sum(purity) / routers, "purity_per_router": purity,
            "chance": Counter(tasks).most_common(1)[0][1] / n}
