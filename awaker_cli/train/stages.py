"""The three stages (docs/design.md section 1) as model set-ups: which architecture, where it starts, what trains.

I   one plain LoRA on every target linear (an AwakerConfig with all seven as lora_targets and no MoE
    targets, so no routers), attached in memory to a dense Qwen2-VL; the base is frozen.
II  the LoRA-MoE replaces it: for every MoE target, every routed expert and the global expert start
    as copies of that linear's stage-I LoRA (A and B); the other linears keep their LoRA; routers are
    fresh. With combine `convex` (p·E + (1−p)·G) the model starts exactly where stage I ended;
    `release` (p²·E + (1−p)·G, for converted release weights) cannot, since p² + 1 − p ≠ 1.
    Experts, global expert, LoRA and routers train.
III experts, global expert and LoRA train; the routers are frozen (not in the optimizer).

`plan_stage` reads only JSON files (config, awaker_config.json, tokenizer), so every recipe problem is
reported before `build_stage_model` loads any weights. Adapters are kept in fp32 while training
whatever the base's dtype.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, missing_processor_files
from ..errors import AwakerError
from ..model.build import adapter_modules, attach_adapters, load_adapter_tensors, load_base
from ..model.config import CONFIG_NAME, AwakerConfig
from ..model.layers import LoRALinear, MoELoRALinear
from .recipe import DEFAULT_MOE_TARGETS, STAGE1_TARGETS, Recipe

# Fields that fix the architecture of a model: stage 3 must not change them.
ARCH_FIELDS = ("rank", "alpha", "lora_targets", "moe_targets", "num_experts", "top_k", "global_expert",
               "combine", "router_temperature", "routing_span")
RUNTIME_FIELDS = ("dropout", "router_noise_std")


@dataclass
class StagePlan:
    stage: int
    source: Path  # the directory whose base weights, config.json and processor files are used
    config: AwakerConfig  # the architecture being trained
    previous: AwakerConfig | None  # init_from's config (stages 2, 3)

    @property
    def trains_routers(self) -> bool:
        return self.stage == 2


def _default(value, fallback):
    return fallback if value is None else value


def _load_previous(path: str, stage: int) -> tuple[Checkpoint, AwakerConfig]:
    ckpt = Checkpoint(path)
    if not (ckpt.path / CONFIG_NAME).is_file():
        raise AwakerError(f"init_from {path}: not an awaker model (no {CONFIG_NAME}); stage {stage} starts from "
                          f"the stage-{stage - 1} output directory")
    prev = AwakerConfig.load(ckpt.path)
    if stage == 2 and prev.moe_targets:
        raise AwakerError(f"init_from {path}: already a LoRA-MoE model (moe_targets {prev.moe_targets}); "
                          "stage 2 starts from a stage-1 output (one plain LoRA)")
    if stage == 3 and not prev.moe_targets:
        raise AwakerError(f"init_from {path}: a plain-LoRA (stage-1) model; stage 3 starts from a stage-2 "
                          "output (run stage 2 first)")
    return ckpt, prev


def _span_token_ids(ckpt: Checkpoint) -> dict[str, int]:
    from ..ops.upcycle import _span_token_ids as read

    return read(ckpt)


def plan_stage(r: Recipe) -> StagePlan:
    a = r.adapter
    if r.stage == 1:
        ckpt = Checkpoint(r.model)
        if (ckpt.path / CONFIG_NAME).is_file():
            raise AwakerError(f"model {r.model}: already an awaker model; stage 1 starts from a dense model "
                              "(use init_from with stage 2 or 3 to continue an awaker model)")
        missing = missing_processor_files(ckpt.path)
        if missing:
            raise AwakerError(f"{ckpt.path}: missing processor/tokenizer files: {', '.join(missing)}")
        cfg = AwakerConfig(
            num_experts=1, top_k=1, global_expert=False, moe_targets=[], router_owners={},
            rank=_default(a.rank, 256), alpha=_default(a.alpha, 512.0), dropout=_default(a.dropout, 0.05),
            lora_targets=list(_default(a.lora_targets, STAGE1_TARGETS)),
            router_noise_std=_default(a.router_noise_std, 0.1), combine="convex",
            routing_span=_default(a.routing_span, "prompt"),
            num_layers=ckpt.num_layers, base_model=str(r.model), span_token_ids=_span_token_ids(ckpt),
            family=ckpt.family.name)
        return StagePlan(1, ckpt.path, cfg.validate(), None)

    ckpt, prev = _load_previous(r.init_from, r.stage)
    if r.stage == 2:
        for name in ("rank", "alpha"):
            value = getattr(a, name)
            if value is not None and value != getattr(prev, name):
                raise AwakerError(f"recipe: adapter.{name} is {value:g} but the stage-1 model {r.init_from} has "
                                  f"{getattr(prev, name):g} (the experts start from its LoRA; leave it null)")
        moe = list(_default(a.moe_targets, DEFAULT_MOE_TARGETS))
        missing = [t for t in moe if t not in prev.lora_targets]
        if missing:
            raise AwakerError(f"recipe: adapter.moe_targets {missing} have no stage-1 LoRA in {r.init_from} "
                              f"(its LoRA targets: {', '.join(prev.lora_targets)})")
        cfg = AwakerConfig(
            num_experts=_default(a.num_experts, 4), rank=prev.rank, alpha=prev.alpha,
            dropout=_default(a.dropout, prev.dropout),
            lora_targets=[t for t in prev.lora_targets if t not in moe], moe_targets=moe,
            top_k=_default(a.top_k, 1), global_expert=_default(a.global_expert, True),
            router_temperature=_default(a.router_temperature, 1.0),
            router_noise_std=_default(a.router_noise_std, 0.1), router_norm_eps=prev.router_norm_eps,
            combine=_default(a.combine, "convex"), routing_span=_default(a.routing_span, prev.routing_span),
            span_token_ids=dict(prev.span_token_ids), num_layers=prev.num_layers, base_model=prev.base_model,
            family=prev.family,
        ).with_moe_targets_only_owners()
        return StagePlan(2, ckpt.path, cfg.validate(), prev)

    for name in ARCH_FIELDS:
        value = getattr(a, name)
        if value is not None and value != getattr(prev, name):
            raise AwakerError(f"recipe: adapter.{name} is {value!r} but {r.init_from} has {getattr(prev, name)!r}; "
                              "stage 3 keeps the stage-2 architecture (leave it null)")
    cfg = dataclasses.replace(prev, dropout=_default(a.dropout, prev.dropout),
                              router_noise_std=_default(a.router_noise_std, prev.router_noise_std))
    return StagePlan(3, ckpt.path, cfg.validate(), prev)


@torch.no_grad()
def _init_from_stage1(model, ckpt: Checkpoint, cfg: AwakerConfig):
    """Stage I -> II: q/k/v keep their LoRA; every expert slot of a MoE linear copies its LoRA."""
    for path, module in adapter_modules(model):
        A, B = ckpt.get(f"{path}.lora_A"), ckpt.get(f"{path}.lora_B")
        if isinstance(module, MoELoRALinear):
            module.lora_A.copy_(A.to(module.lora_A.dtype)[None].expand_as(module.lora_A))
            module.lora_B.copy_(B.to(module.lora_B.dtype)[None].expand_as(module.lora_B))
        else:
            module.lora_A.copy_(A)
            module.lora_B.copy_(B)


def build_stage_model(plan: StagePlan, *, dtype: torch.dtype, device: torch.device, seed: int):
    """Load the base, attach fp32 adapters, initialise them for the stage and set what trains."""
    # straight onto the GPU (each torchrun process its own): no full CPU copy per process
    model, ckpt = load_base(plan.source, dtype=dtype, device=None if device.type == "cpu" else str(device))
    torch.manual_seed(seed)  # fresh LoRA A and routers are reproducible
    attach_adapters(model, plan.config, adapter_dtype=torch.float32)
    if plan.stage == 2:
        _init_from_stage1(model, ckpt, plan.config)
    elif plan.stage == 3:
        load_adapter_tensors(model, ckpt)
    model.to(device)
    set_trainable(model, plan)
    return model


def set_trainable(model, plan: StagePlan):
    model.requires_grad_(False)
    for _, module in adapter_modules(model):
        module.lora_A.requires_grad_(True)
        module.lora_B.requires_grad_(True)
    model.awaker_routers.requires_grad_(plan.trains_routers)


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def describe_trainable(model) -> dict:
    counts = {"lora": 0, "experts": 0, "routers": 0}
    for _, module in adapter_modules(model):
        key = "experts" if isinstance(module, MoELoRALinear) else "lora"
        assert isinstance(module, (LoRALinear, MoELoRALinear))
        counts[key] += module.lora_A.numel() + module.lora_B.numel()
    if any(p.requires_grad for p in model.awaker_routers.parameters()):
        counts["routers"] = sum(p.numel() for p in model.awaker_routers.parameters())
    counts["total"] = sum(p.numel() for _, p in trainable_parameters(model))
    return counts
