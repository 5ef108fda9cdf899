"""`awaker prune`: drop rarely used experts (their adapter slots and router rows) and/or cut the LoRA
rank by SVD, then report what it cost in loss on a data file.

Expert usage is the share of all router decisions (every record, router and top-k pick) an expert
gets on the data file; the stacked layout gives every MoE linear the same experts, so an expert is
kept or removed everywhere. Removing a router row never changes the choice of a record whose expert
stays (the softmax arg-max over fewer logits is the same), only the probability p it gets.
"""
from __future__ import annotations

import dataclasses

import torch

from ..checkpoint import DEFAULT_SHARD_SIZE
from ..checkpoint.keys import ROUTER_PREFIX
from ..errors import AwakerError
from ..progress import no_bar
from .records import read_records
from .rewrite import check_target, lowrank, measure, open_source, stream, write_output
from .stats import expert_usage


def choose_experts(usage: torch.Tensor, *, min_share: float | None, keep: int | None, top_k: int) -> list[int]:
    """The experts to keep, in their order: those with share >= min_share, or the `keep` most used."""
    E = usage.shape[0]
    if keep is not None:
        if not 1 <= keep <= E:
            raise AwakerError(f"--keep must be between 1 and the number of experts ({E}), got {keep}")
        order = sorted(range(E), key=lambda e: (-float(usage[e]), e))
        kept = sorted(order[:keep])
    else:
        if not 0 <= min_share < 1:
            raise AwakerError(f"--min-share must be in [0, 1), got {min_share}")
        kept = [e for e in range(E) if float(usage[e]) >= min_share]
    if len(kept) < max(top_k, 1):
        raise AwakerError(f"pruning would leave {len(kept)} expert(s), fewer than top-k ({top_k}); "
                          "lower --min-share or raise --keep")
    return kept


def prune(source, out, *, data=None, min_share: float | None = None, keep: int | None = None,
          rank: int | None = None, batch_size: int = 4, limit: int | None = None, force=False, dry_run=False,
          max_shard_size=DEFAULT_SHARD_SIZE, full=False, bar=no_bar) -> dict:
    """Drop experts (by usage on `data`) and/or cut the rank. The output keeps the source's form: an
    adapter-only source gives an adapter-only output on the same base, unless `full`."""
    ckpt, cfg = open_source(source, "prune")
    if not dry_run:
        check_target(ckpt, out, force, data)
    prune_experts = min_share is not None or keep is not None
    if min_share is not None and keep is not None:
        raise AwakerError("give --min-share or --keep, not both")
    if not prune_experts and rank is None:
        raise AwakerError("nothing to do: give --min-share, --keep and/or --rank")
    if prune_experts and data is None:
        raise AwakerError("pruning experts by usage needs --data (a data file to measure usage on)")
    if rank is not None and not 1 <= rank < cfg.rank:
        raise AwakerError(f"--rank must be between 1 and the current rank minus one ({cfg.rank - 1}), got {rank}")

    records = read_records(data, limit) if data is not None else None
    before = measure(ckpt.path, records, batch_size=batch_size, bar=bar, what="source") if records else None
    kept = list(range(cfg.num_experts))
    summary = {"source": str(ckpt.path), "output": str(out)}
    if prune_experts:
        usage = expert_usage(before, cfg.num_experts)
        kept = choose_experts(usage, min_share=min_share, keep=keep, top_k=cfg.top_k)
        summary.update(usage=[round(float(u), 4) for u in usage], kept_experts=kept,
                       removed_experts=[e for e in range(cfg.num_experts) if e not in kept])
    new_rank = rank or cfg.rank
    # alpha follows the rank so that the scaling alpha/rank, and so every kept product, is unchanged.
    new_cfg = dataclasses.replace(cfg, num_experts=len(kept), rank=new_rank, alpha=cfg.scaling * new_rank)
    summary["awaker_config"] = new_cfg.to_dict()
    if before is not None:
        summary["loss_before"] = before.loss
    if dry_run:
        return summary

    slots = kept + ([cfg.num_experts] if cfg.global_expert else [])
    energy: dict[str, float] = {}

    def reduce(path, A, B):
        if rank is None:
            return A, B
        kept_e = total_e = 0.0
        out_A, out_B = [], []
        for a, b in zip(A.reshape(-1, *A.shape[-2:]), B.reshape(-1, *B.shape[-2:])):
            nb, na, k, t = lowrank(b, a, new_rank)
            out_A.append(na.to(A.dtype))
            out_B.append(nb.to(B.dtype))
            kept_e, total_e = kept_e + k, total_e + t
        energy[path] = kept_e / total_e if total_e > 0 else 1.0
        return torch.stack(out_A).reshape(*A.shape[:-2], new_rank, A.shape[-1]), \
            torch.stack(out_B).reshape(*B.shape[:-2], B.shape[-2], new_rank)

    def adapter(path, A, B):
        if A.dim() == 3:
            A, B = A[slots], B[slots]
        A, B = reduce(path, A, B)
        return [(path + ".lora_A", A), (path + ".lora_B", B)]

    def routers(bank):
        return [(ROUTER_PREFIX + "norm_weight", bank["norm_weight"]),
                (ROUTER_PREFIX + "gate_weight", bank["gate_weight"][:, kept]),
                (ROUTER_PREFIX + "gate_bias", bank["gate_bias"][:, kept])]

    card = [f"Made by `awaker prune` from `{ckpt.path}`."]
    if prune_experts:
        card.append(f"Experts kept: {kept} of {cfg.num_experts} (by usage on `{data}`); router rows of the others removed.")
    if rank is not None:
        card.append(f"LoRA rank reduced from {cfg.rank} to {new_rank} by SVD (alpha {new_cfg.alpha:g}, same scaling).")
    adapter_only = ckpt.base is not None and not full
    with bar("prune", ckpt.adapter_bytes if adapter_only else ckpt.total_bytes) as advance:
        tensors = stream(ckpt, adapter=adapter, routers=routers, progress=advance, adapters_only=adapter_only)
        summary.update(write_output(out, ckpt, tensors, force=force, awaker_config=new_cfg, adapter_only=adapter_only,
                                    max_shard_size=max_shard_size, title="awaker LoRA-MoE model (pruned)", card=card))
    summary["adapter_only"] = adapter_only
    if energy:
        summary["energy_kept"] = {"min": min(energy.values()), "mean": sum(energy.values()) / len(energy),
                                  "per_module": energy}
    if records:
        after = measure(out, records, batch_size=batch_size, bar=bar, what="pruned")
        summary.update(loss_after=after.loss, loss_change=after.loss - before.loss,
                       token_agreement=before.agreement(after))
    return summary

