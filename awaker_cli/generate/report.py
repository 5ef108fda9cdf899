"""Explaining a routing: which expert each router chose, with what probability, in a few readable lines.

Routers come in groups, one per router-owning target (release: o_proj, and gate_proj whose choice
up_proj and down_proj reuse), one router per layer in each group.
"""
from __future__ import annotations

from ..model.config import AwakerConfig
from ..model.routing import Routing


def routing_report(cfg: AwakerConfig, routing: Routing, row: int = 0) -> dict:
    """The routing of sequence `row` as plain data: per router group the most chosen expert (by the
    top-1 choice of each layer), how many layers chose it and its mean probability there, and per layer
    every chosen expert with its probability and the global expert's weight."""
    owners = cfg.router_names
    ids = routing.expert_ids[row].tolist()  # [R][k]
    probs = routing.probs[row].tolist()
    gw = None if routing.global_weight is None else routing.global_weight[row].tolist()
    groups = []
    for g, owner in enumerate(owners):
        layers = []
        for layer in range(cfg.num_layers):
            r = layer * len(owners) + g
            entry = {"layer": layer, "experts": ids[r], "p": [round(p, 4) for p in probs[r]]}
            if gw is not None:
                entry["global_weight"] = round(gw[r], 4)
            layers.append(entry)
        counts = [0] * cfg.num_experts
        for entry in layers:
            counts[entry["experts"][0]] += 1
        top = max(range(cfg.num_experts), key=lambda e: counts[e])
        chosen = [entry["p"][0] for entry in layers if entry["experts"][0] == top]
        groups.append({
            "router": owner,
            "drives": [t for t in cfg.moe_targets if cfg.router_owners[t] == owner],
            "top_expert": top,
            "layers_choosing_it": counts[top],
            "layers": cfg.num_layers,
            "mean_p": round(sum(chosen) / len(chosen), 4),
            "counts": counts,
            "per_layer": layers,
        })
    return {"experts": cfg.num_experts, "top_k": cfg.top_k, "global_expert": cfg.global_expert,
            "combine": cfg.combine, "groups": groups}


def format_routing(report: dict) -> list[str]:
    """One line per router group, e.g.
    `o_proj router: expert 2 in 20/28 layers (mean p 0.41) · by layer 2 2 1 0 …`"""
    lines = []
    for g in report["groups"]:
        also = [t for t in g["drives"] if t != g["router"]]
        name = f"{g['router']} router" + (f" (also {', '.join(also)})" if also else "")
        by_layer = " ".join(str(entry["experts"][0]) for entry in g["per_layer"])
        lines.append(f"{name}: expert {g['top_expert']} in {g['layers_choosing_it']}/{g['layers']} layers "
                     f"(mean p {g['mean_p']:.2f}) · by layer {by_layer}")
    return lines
