"""Describe a dense (any supported family) or awaker directory from its headers alone (no weights are loaded)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..checkpoint import Checkpoint, missing_processor_files
from ..checkpoint.files import processor_files
from ..checkpoint.keys import ROUTER_PREFIX, is_adapter_key
from ..model.config import CONFIG_NAME, AwakerConfig


def describe(path: str | Path) -> dict:
    ckpt = Checkpoint(path)
    text, vision = ckpt.text_config, ckpt.config.get("vision_config", {})
    cfg = AwakerConfig.load(ckpt.path) if (ckpt.path / CONFIG_NAME).exists() else None

    groups = Counter()
    moe_adapter = 0
    for key, t in ckpt.tensors.items():
        if key.startswith(ROUTER_PREFIX):
            groups["routers"] += t.numel
        elif is_adapter_key(key):
            is_moe = len(t.shape) == 3
            groups["moe_experts" if is_moe else "lora"] += t.numel
            moe_adapter += t.numel if is_moe else 0
        elif key.startswith("visual."):
            groups["vision"] += t.numel
        else:
            groups["language_model"] += t.numel
    total = sum(groups.values())
    active = total
    if cfg is not None and cfg.num_slots:
        # Per token, a MoE linear runs top-k routed experts plus the global expert, not all slots.
        used = cfg.top_k + (1 if cfg.global_expert else 0)
        active = total - moe_adapter + moe_adapter * used // cfg.num_slots

    info = {
        "path": str(ckpt.path),
        "kind": "awaker" if cfg else ckpt.family.label.lower(),  # dense: qwen2-vl, qwen2.5-vl, qwen3-vl
        "family": ckpt.family.label,
        "architecture": {
            "model_type": ckpt.config.get("model_type"),
            "layers": ckpt.num_layers,
            "hidden_size": ckpt.hidden_size,
            "intermediate_size": text.get("intermediate_size"),
            "attention_heads": text.get("num_attention_heads"),
            "kv_heads": text.get("num_key_value_heads"),
            "vocab_size": text.get("vocab_size"),
            "vision_depth": vision.get("depth"),
            "vision_embed_dim": vision.get("embed_dim") or vision.get("hidden_size"),
        },
        "parameters": {"total": total, "active_per_token": active, **dict(groups)},
        "dtypes": dict(Counter(str(t.dtype).removeprefix("torch.") for t in ckpt.tensors.values())),
        "shards": [f.name for f in ckpt.files],
        "size_on_disk": sum(f.stat().st_size for f in ckpt.path.iterdir() if f.is_file()),
        "processor_files": processor_files(ckpt.path),
        "missing_files": missing_processor_files(ckpt.path),
    }
    if cfg:
        info["awaker"] = {
            "experts": cfg.num_experts, "global_expert": cfg.global_expert, "rank": cfg.rank,
            "alpha": cfg.alpha, "top_k": cfg.top_k, "combine": cfg.combine,
            "lora_targets": cfg.lora_targets, "moe_targets": cfg.moe_targets,
            "routers": cfg.num_routers, "router_owners": cfg.router_owners,
            "routing_span": cfg.routing_span, "base_model": cfg.base_model, "family": cfg.family,
        }
    if ckpt.base is not None:  # adapter-only: the base is found and verified by Checkpoint
        info["base"] = {"path": str(ckpt.base.path), "recorded_path": ckpt.base_record["path"],
                        "hub_id": ckpt.base_record.get("hub_id"), "verified": True,
                        "tensors_sha256": ckpt.base_record["tensors_sha256"]}
    # What other tools get from this directory: transformers skips the awaker tensors (adapters, routers).
    if ckpt.base is not None:
        loads = "nothing: the weights here are adapters only (awaker export writes a complete model)"
    elif cfg:
        loads = ("only the base model (the adapters and routers are awaker's; awaker merge bakes a routing into a "
                 "dense model)")
    else:
        loads = "the whole model"
    info["transformers_loads"] = loads
    return info
