"""`awaker merge`: fold adapters into base weights, bake one routing into a plain dense model of the
family, or merge routed experts. Every mode streams the source one module at a time (fp32 math, stored
dtype out).

Merging experts G = {i, j, …} into one:
- the merged expert's product is the mean of theirs, (1/n) Σ s·B_e A_e, re-factorised to rank r by
  SVD (best rank-r approximation), or kept exactly with rank n·r (`keep_rank_sum`; every other
  adapter is then zero-padded to n·r, since all adapters share one rank, and alpha grows with it so
  the scaling alpha/rank is unchanged);
- the router: softmax top-1 would keep sending every input that picked i or j to the merged expert if
  its logit were logsumexp(l_i, l_j) (its probability is then p_i + p_j). That is not a linear
  function of the input, so the merged gate row is its first-order approximation at l_i = l_j: the
  mean of the rows and of the biases, plus T·log n. It is exact when the merged experts' logits
  agree and under-estimates otherwise (by at most |l_i − l_j|/2). With a data file, the merged bias
  is then raised by the smallest amount (plus a small margin) that makes every record of that file
  which picked an expert of G pick the merged one (top-1; exact in fp32, a bf16 router adds its own
  rounding), which is the guarantee the tests check; records that picked another expert may move to
  the merged one too, and their count is reported.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter

import torch

from ..checkpoint import DEFAULT_SHARD_SIZE
from ..checkpoint.keys import ROUTER_PREFIX, lm_module_path
from ..errors import AwakerError
from ..kernels.routing_ref import router_logits
from ..model.config import AwakerConfig
from ..model.routing import Routing
from ..progress import no_bar
from .rewrite import check_target, lowrank, open_source, router_inputs, stream, write_output

# Logit units above the strongest merged-away expert: more than a bf16 rounding step of a bias below 2.
CALIBRATION_MARGIN = 2e-2


def router_name(cfg: AwakerConfig, r: int) -> str:
    owners = cfg.router_names
    return f"layer {r // len(owners)} {owners[r % len(owners)]}"


# -- fold q/k/v LoRA ------------------------------------------------------------------------------------
def fold_lora(source, out, *, force=False, dry_run=False, max_shard_size=DEFAULT_SHARD_SIZE, bar=no_bar) -> dict:
    """Fold every plain LoRA (q/k/v) into its base weight; the result is an awaker model without them, or a
    plain dense model when there are no experts (a stage-I model)."""
    ckpt, cfg = open_source(source, "merge")
    if not dry_run:
        check_target(ckpt, out, force)
    folded = set(lm_module_path(i, p) for i in range(cfg.num_layers) for p in cfg.lora_targets)
    new_cfg = dataclasses.replace(cfg, lora_targets=[])
    dense = not new_cfg.moe_targets  # a stage-I model folded: nothing of awaker's is left
    summary = {"mode": "fold-lora-dense" if dense else "fold-lora", "source": str(ckpt.path), "output": str(out),
               "folded_modules": len(folded), "awaker_config": None if dense else new_cfg.to_dict()}
    if not folded:
        raise AwakerError(f"{ckpt.path}: has no plain LoRA to fold (lora_targets is empty)")
    if dry_run:
        return summary

    def weight(path, W):
        if path not in folded:
            return None
        A, B = ckpt.get(path + ".lora_A"), ckpt.get(path + ".lora_B")
        return [(path + ".weight", _add_delta(W, cfg.scaling * (B.float() @ A.float())))]

    def adapter(path, A, B):
        return [] if path in folded else [(path + ".lora_A", A), (path + ".lora_B", B)]

    if not dense:
        card = [f"Made by `awaker merge` from `{ckpt.path}`: the plain LoRA of {', '.join(cfg.lora_targets)} is "
                "folded into the base weights (fp32 math); experts and routers are unchanged."]
        title, routers = "awaker LoRA-MoE model (q/k/v LoRA merged)", None
    else:  # a plain dense model: no awaker_config.json, no (empty) router tensors
        card = [f"Made by `awaker merge` from `{ckpt.path}`: its plain LoRA ({', '.join(cfg.lora_targets)}) is "
                "folded into the base weights (fp32 math)."]
        title, routers, new_cfg = f"dense {ckpt.family.label} (awaker LoRA merged in)", (lambda bank: []), None
    with bar("merge", ckpt.total_bytes) as advance:
        tensors = stream(ckpt, weight=weight, adapter=adapter, routers=routers, progress=advance)
        summary.update(write_output(out, ckpt, tensors, force=force, awaker_config=new_cfg,
                                    max_shard_size=max_shard_size, title=title, card=card))
    return summary


def _add_delta(W: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return (W.float() + delta).to(W.dtype)


# -- bake a routing into a dense model --------------------------------------------------------------------
def routing_from_data(cfg: AwakerConfig, expert_ids: torch.Tensor, probs: torch.Tensor) -> tuple[Routing, list]:
    """Per router, the expert set the data picks most, with the mean probabilities of the records that
    picked it. Returns the routing (batch 1) and, per router, the share of records that picked it."""
    ids, ps, shares = [], [], []
    for r in range(expert_ids.shape[1]):
        picks = [tuple(x) for x in expert_ids[:, r].tolist()]
        choice, count = Counter(picks).most_common(1)[0]
        rows = torch.tensor([p == choice for p in picks])
        ids.append(list(choice))
        ps.append(probs[rows, r].float().mean(0))
        shares.append(count / len(picks))
    routing = Routing.from_probs(torch.tensor([ids]), torch.stack(ps)[None], cfg.combine, cfg.global_expert)
    return routing, shares


def routing_for_expert(cfg: AwakerConfig, expert: int, p: torch.Tensor | float) -> Routing:
    """Every router picks `expert` with probability p (a float, or one per router [R])."""
    check_expert(cfg, expert)
    if cfg.top_k != 1:
        raise AwakerError(f"--expert bakes a top-1 routing, this model routes top-{cfg.top_k}: use --data instead")
    p = torch.as_tensor(p, dtype=torch.float32).expand(cfg.num_routers).clone()
    if not ((p >= 0) & (p <= 1)).all():
        raise AwakerError("the expert probability p must be between 0 and 1")
    ids = torch.full((1, cfg.num_routers, 1), expert, dtype=torch.long)
    return Routing.from_probs(ids, p[None, :, None], cfg.combine, cfg.global_expert)


def check_expert(cfg: AwakerConfig, expert: int):
    if not 0 <= expert < cfg.num_experts:
        raise AwakerError(f"expert {expert} does not exist: this model has {cfg.num_experts} routed experts "
                          f"(0 to {cfg.num_experts - 1}); the global expert is always on and cannot be chosen")


def bake(source, out, routing: Routing, *, force=False, dry_run=False, max_shard_size=DEFAULT_SHARD_SIZE,
         bar=no_bar, how: str = "") -> dict:
    """Write a plain Qwen2-VL whose weights are W + s·(Σ w_e B_e A_e + w_g B_g A_g) under `routing`
    (batch 1) and W + s·B A for the plain LoRA; routers and adapters are dropped."""
    ckpt, cfg = open_source(source, "merge")
    if not dry_run:
        check_target(ckpt, out, force)
    targets = {lm_module_path(i, p): (i, p) for i in range(cfg.num_layers) for p in (*cfg.lora_targets, *cfg.moe_targets)}
    chosen = [{"router": router_name(cfg, r), "experts": routing.expert_ids[0, r].tolist(),
               "p": [round(float(x), 6) for x in routing.probs[0, r]],
               "global_weight": None if routing.global_weight is None else round(float(routing.global_weight[0, r]), 6)}
              for r in range(cfg.num_routers)]
    summary = {"mode": "bake", "source": str(ckpt.path), "output": str(out), "routing": chosen, "how": how,
               "combine": cfg.combine}
    if dry_run:
        return summary

    def weight(path, W):
        if path not in targets:
            return None
        layer, proj = targets[path]
        A, B = ckpt.get(path + ".lora_A").float(), ckpt.get(path + ".lora_B").float()
        if proj in cfg.lora_targets:
            delta = B @ A
        else:
            r = cfg.router_index(layer, proj)
            delta = torch.zeros(W.shape)
            for e, w in zip(routing.expert_ids[0, r].tolist(), routing.expert_weights[0, r].tolist()):
                delta += w * (B[e] @ A[e])
            if routing.global_weight is not None:
                delta += float(routing.global_weight[0, r]) * (B[-1] @ A[-1])
        return [(path + ".weight", _add_delta(W, cfg.scaling * delta))]

    card = [f"Made by `awaker merge` from the awaker model `{ckpt.path}`: one routing ({how}) folded into the "
            f"base weights with combine `{cfg.combine}`; adapters and routers removed.",
            f"A plain {ckpt.family.label}: it loads with transformers' "
            f"{ckpt.family.model_class}.from_pretrained."]
    with bar("bake", ckpt.total_bytes) as advance:
        tensors = stream(ckpt, weight=weight, adapter=lambda *a: [], routers=lambda bank: [], progress=advance)
        summary.update(write_output(out, ckpt, tensors, force=force, awaker_config=None,
                                    max_shard_size=max_shard_size, title=f"dense {ckpt.family.label} (awaker routing baked in)",
                                    card=card))
    return summary


# -- merge experts ---------------------------------------------------------------------------------------
def parse_experts(text: str, cfg: AwakerConfig) -> list[int]:
    try:
        group = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise AwakerError(f"--experts takes expert numbers separated by commas (e.g. 1,3), got {text!r}")
    if len(group) < 2:
        raise AwakerError("--experts needs at least two different experts to merge (e.g. 1,3)")
    for e in group:
        check_expert(cfg, e)
    if cfg.num_experts - len(group) + 1 < cfg.top_k:
        raise AwakerError(f"merging {len(group)} experts would leave fewer experts than top-k ({cfg.top_k})")
    return group


def merge_experts(source, out, group: list[int], *, keep_rank_sum=False, span_means: torch.Tensor | None = None,
                  force=False, dry_run=False, max_shard_size=DEFAULT_SHARD_SIZE, full=False, bar=no_bar) -> dict:
    """Merge the routed experts `group` into one (at the position of the smallest) in every MoE linear.

    span_means [N, H]: router inputs of a data file (ops.records.run_data) to calibrate the merged bias.
    The base is unchanged, so an adapter-only source gives an adapter-only output, unless `full`.
    """
    ckpt, cfg = open_source(source, "merge")
    if not dry_run:
        check_target(ckpt, out, force)
    n, keep_first = len(group), group[0]
    # New order of routed experts: the merged one takes the place of the first of the group.
    order = [e for e in range(cfg.num_experts) if e not in group or e == keep_first]
    new_rank = cfg.rank * n if keep_rank_sum else cfg.rank
    new_cfg = dataclasses.replace(cfg, num_experts=len(order), rank=new_rank,
                                  alpha=cfg.alpha * new_rank / cfg.rank)
    mapping = {e: order.index(keep_first if e in group else e) for e in range(cfg.num_experts)}
    summary = {"mode": "merge-experts", "source": str(ckpt.path), "output": str(out), "merged": group,
               "new_index": mapping, "keep_rank_sum": keep_rank_sum, "awaker_config": new_cfg.to_dict()}
    report = {}

    def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
        if t.shape[dim] == new_rank:
            return t
        shape = list(t.shape)
        shape[dim] = new_rank - t.shape[dim]
        return torch.cat([t, torch.zeros(shape, dtype=t.dtype)], dim)

    def adapter(path, A, B):
        if A.dim() == 2:  # a plain LoRA: only its rank may change
            return [(path + ".lora_A", pad(A, 0)), (path + ".lora_B", pad(B, 1))]
        Bcat = torch.cat([B[e].float() for e in group], 1) / n  # mean of the products B_e A_e
        Acat = torch.cat([A[e].float() for e in group], 0)
        if keep_rank_sum:
            mB, mA = Bcat, Acat
        else:
            mB, mA, kept, total = lowrank(Bcat, Acat, cfg.rank)
            report.setdefault("energy", {})[path] = kept / total if total > 0 else 1.0
        slots_A = [mA.to(A.dtype) if e == keep_first else pad(A[e], 0) for e in order] + (
            [pad(A[-1], 0)] if cfg.global_expert else [])
        slots_B = [mB.to(B.dtype) if e == keep_first else pad(B[e], 1) for e in order] + (
            [pad(B[-1], 1)] if cfg.global_expert else [])
        return [(path + ".lora_A", torch.stack(slots_A)), (path + ".lora_B", torch.stack(slots_B))]

    def routers(bank):
        gw, gb = bank["gate_weight"].float(), bank["gate_bias"].float()
        row = gw[:, group].mean(1)
        bias = gb[:, group].mean(1) + cfg.router_temperature * math.log(n)
        if span_means is not None:
            # Smallest raise that sends every calibration record that picked a merged expert to the merged one.
            normed = router_inputs(bank, span_means, cfg.router_norm_eps)
            logits = router_logits(span_means.float(), bank["norm_weight"].float(), gw, gb, eps=cfg.router_norm_eps)
            picked_group = torch.isin(logits.argmax(-1), torch.tensor(group))  # [N, R]
            strongest = logits[:, :, group].max(-1).values
            merged = torch.einsum("nrh,rh->nr", normed, row) + bias
            gap = torch.where(picked_group, strongest - merged + CALIBRATION_MARGIN, torch.zeros_like(merged))
            bias = bias + gap.clamp(min=0).max(0).values
            merged = torch.einsum("nrh,rh->nr", normed, row) + bias
            new_logits = torch.stack([merged if e == keep_first else logits[:, :, e] for e in order], -1)
            moved = ~picked_group & (new_logits.argmax(-1) == mapping[keep_first])
            report["calibration"] = {"records": int(span_means.shape[0]),
                                             "records_moved_to_merged": int(moved.any(1).sum()),
                                             "router_decisions_moved": int(moved.sum())}
        new_w = torch.stack([row if e == keep_first else gw[:, e] for e in order], 1)
        new_b = torch.stack([bias if e == keep_first else gb[:, e] for e in order], 1)
        dtype = bank["gate_weight"].dtype
        return [(ROUTER_PREFIX + "norm_weight", bank["norm_weight"]),
                (ROUTER_PREFIX + "gate_weight", new_w.to(dtype)), (ROUTER_PREFIX + "gate_bias", new_b.to(dtype))]

    if dry_run:
        return summary
    how = f"rank {new_rank}, exact (ranks concatenated)" if keep_rank_sum else f"rank {cfg.rank} by SVD"
    card = [f"Made by `awaker merge` from `{ckpt.path}`: routed experts {group} merged into expert "
            f"{mapping[keep_first]} (mean of their products, {how}); {new_cfg.num_experts} routed experts remain.",
            "Router: merged gate row = mean of the rows, bias = mean + T·log n (first-order logsumexp)"
            + (", raised to keep every calibration record's choice." if span_means is not None else ".")]
    adapter_only = ckpt.base is not None and not full
    with bar("merge", ckpt.adapter_bytes if adapter_only else ckpt.total_bytes) as advance:
        tensors = stream(ckpt, adapter=adapter, routers=routers, progress=advance, adapters_only=adapter_only)
        summary.update(write_output(out, ckpt, tensors, force=force, awaker_config=new_cfg, adapter_only=adapter_only,
                                    max_shard_size=max_shard_size, title="awaker LoRA-MoE model (experts merged)",
                                    card=card))
    summary["adapter_only"] = adapter_only
    energy = report.pop("energy", None)
    if energy:
        summary["energy_kept"] = {"min": min(energy.values()), "mean": sum(energy.values()) / len(energy),
                                  "per_module": energy}
    summary.update(report)
    return summary


# -- the command's entry point ------------------------------------------------------------------------------
def merge(source, out, *, expert: int | None = None, p: float | None = None, data=None, experts: str | None = None,
          keep_rank_sum: bool = False, batch_size: int = 4, limit: int | None = None, force=False, dry_run=False,
          max_shard_size=DEFAULT_SHARD_SIZE, full=False, bar=no_bar) -> dict:
    """Pick the mode from the options: --experts merges experts, --expert/--data bakes a dense model,
    neither folds the q/k/v LoRA. full: with --experts, a complete output even from an adapter-only
    source (a fold or a bake changes the base weights: always complete)."""
    from .records import read_records
    from .rewrite import measure
    from .stats import full_probs, router_bank

    ckpt, cfg = open_source(source, "merge")
    if not dry_run:
        check_target(ckpt, out, force, data, needed=ckpt.total_bytes)  # dense or MoE: at most the source's size
    common = dict(force=force, dry_run=dry_run, max_shard_size=max_shard_size, bar=bar)
    if keep_rank_sum and experts is None:
        raise AwakerError("--keep-rank-sum only applies to --experts")
    if full and experts is None:
        raise AwakerError("--full only applies to --experts (a fold or a bake always writes a complete model)")
    if p is not None and expert is None:
        raise AwakerError("--p is the probability of the expert given with --expert")
    if experts is not None:
        if expert is not None:
            raise AwakerError("give --experts (merge experts) or --expert (bake a dense model), not both")
        group = parse_experts(experts, cfg)
        span_means = None
        if data is not None:
            run = measure(ckpt.path, read_records(data, limit), batch_size=batch_size, bar=bar, what="calibrate")
            span_means = run.span_means
        return merge_experts(ckpt.path, out, group, keep_rank_sum=keep_rank_sum, span_means=span_means, full=full,
                             **common)
    if expert is None and data is None:
        return fold_lora(ckpt.path, out, **common)
    if expert is not None:
        check_expert(cfg, expert)
        if p is None and data is None:
            raise AwakerError("--expert needs the probability to bake: --p 0.8, or --data FILE for the mean observed")
    if expert is not None and p is not None:
        if data is not None:
            raise AwakerError("give --p or --data for the expert's probability, not both")
        return bake(ckpt.path, out, routing_for_expert(cfg, expert, p), how=f"expert {expert}, p {p:g}", **common)
    run = measure(ckpt.path, read_records(data, limit), batch_size=batch_size, bar=bar, what="route")
    if expert is not None:  # the mean router probability of that expert over the data, per router
        mean_p = full_probs(router_bank(ckpt), cfg, run.span_means)[:, :, expert].mean(0)
        return bake(ckpt.path, out, routing_for_expert(cfg, expert, mean_p),
                    how=f"expert {expert}, mean p on {data}", **common)
    routing, shares = routing_from_data(cfg, run.expert_ids, run.probs)
    result = bake(ckpt.path, out, routing, how=f"the routing {data} picks most", **common)
    for entry, share in zip(result["routing"], shares):
        entry["share_of_records"] = round(share, 4)
    return result
