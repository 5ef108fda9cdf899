"""`awaker stats`: how an awaker model routes a data file: per router and per task, the share of
records each expert gets, the mean probability of the chosen expert and the router's entropy."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import AwakerError
from ..model.config import AwakerConfig
from ..progress import no_bar
from .records import DataPass, read_records
from .rewrite import measure, open_source


def full_probs(model_bank: dict[str, torch.Tensor], cfg: AwakerConfig, span_means: torch.Tensor) -> torch.Tensor:
    """[N, R, E] every expert's router probability (eval mode: no noise)."""
    from .rewrite import router_probs

    return router_probs(model_bank, span_means, cfg.router_norm_eps, cfg.router_temperature)


def _summary(ids: torch.Tensor, probs: torch.Tensor, full: torch.Tensor | None, experts: int) -> dict:
    """ids/probs [N, k] chosen experts of one router (or [N, R, k] pooled), full [N, ..., E]."""
    counts = torch.bincount(ids.reshape(-1), minlength=experts)
    share = counts.float() / counts.sum()
    out = {"counts": counts.tolist(), "share": [round(float(s), 4) for s in share],
           "mean_p": round(float(probs.sum(-1).mean()), 4),
           # entropy of the usage histogram: log E when balanced, 0 when one expert takes all
           "usage_entropy": round(float(-(share * share.clamp(min=1e-12).log()).sum()), 4)}
    if full is not None:
        out["entropy"] = round(float(-(full * full.clamp(min=1e-12).log()).sum(-1).mean()), 4)
    return out


def routing_stats(cfg: AwakerConfig, run: DataPass, bank: dict[str, torch.Tensor] | None = None) -> dict:
    """Histograms per router, overall and per task from one data pass of an awaker model."""
    from .merge import router_name

    E = cfg.num_experts
    full = full_probs(bank, cfg, run.span_means) if bank is not None and run.span_means is not None else None
    routers = []
    for r in range(cfg.num_routers):
        routers.append({"router": r, "name": router_name(cfg, r),
                        **_summary(run.expert_ids[:, r], run.probs[:, r], None if full is None else full[:, r], E)})
    stats = {"records": len(run.tasks), "experts": E, "top_k": cfg.top_k, "max_entropy": round(math.log(E), 4),
             "loss": round(run.loss, 6), "tokens": run.tokens,
             "overall": _summary(run.expert_ids, run.probs, full, E), "routers": routers}
    tasks = sorted({t for t in run.tasks if t is not None})
    if tasks:
        stats["tasks"] = {}
        for task in tasks:
            rows = torch.tensor([t == task for t in run.tasks])
            sub_full = None if full is None else full[rows]
            stats["tasks"][task] = {
                "records": int(rows.sum()),
                **_summary(run.expert_ids[rows], run.probs[rows], sub_full, E),
                "routers": [_summary(run.expert_ids[rows, r], run.probs[rows, r], None, E)["share"]
                            for r in range(cfg.num_routers)],
            }
    return stats


def expert_usage(run: DataPass, experts: int) -> torch.Tensor:
    """[E] share of all router decisions (every record, router and top-k slot) each expert got."""
    counts = torch.bincount(run.expert_ids.reshape(-1), minlength=experts).float()
    return counts / counts.sum()


def router_bank(ckpt) -> dict[str, torch.Tensor]:
    from ..checkpoint.keys import ROUTER_PREFIX

    return {k[len(ROUTER_PREFIX):]: ckpt.get(k) for k in ckpt.tensors if k.startswith(ROUTER_PREFIX)}


def stats(model: str | Path, data: str | Path, *, batch_size: int = 4, limit: int | None = None,
          bar=no_bar, min_pixels: int | None = None, max_pixels: int | None = None,
          image_root: str | None = None, plot: str | Path | None = None, force: bool = False) -> dict:
    """plot: also draw the routing heatmap (plots.routing_plot) to this PNG."""
    if plot is not None:
        from ..plots import check_plot_target

        check_plot_target(plot, force, [model, data])
    ckpt, cfg = open_source(model, "stats", quantized_ok=True)
    if cfg.num_routers == 0:
        raise AwakerError(f"{ckpt.path}: a plain-LoRA model (stage 1) has no routers, so there is no routing to "
                          "report; run stats on a LoRA-MoE model (a stage-2 or stage-3 output, or an upcycled one)")
    records = read_records(data, limit, image_root)
    run = measure(ckpt.path, records, batch_size=batch_size, bar=bar, what="route", min_pixels=min_pixels,
                  max_pixels=max_pixels)
    if run.expert_ids is None:
        raise AwakerError(f"{ckpt.path}: no routing was recorded")
    out = {"model": str(ckpt.path), "data": str(data), **routing_stats(cfg, run, router_bank(ckpt))}
    if plot is not None:
        from ..plots import routing_plot, share_by_layer

        share = share_by_layer([r["counts"] for r in out["routers"]], len(cfg.router_names))
        routing_plot(share, cfg.router_names, plot, f"routing of {out['records']} records of {Path(data).name} by "
                     f"{ckpt.path.name} (top-{cfg.top_k} of {cfg.num_experts} experts)")
        out["plot"] = str(plot)
    return out
