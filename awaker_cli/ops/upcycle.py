"""Upcycle a dense vision-language checkpoint (any family of model/families.py) into LoRA-MoE form,
streaming tensor by tensor.

The base tensors are copied bit for bit; every LoRA B starts at zero, so the new model computes
exactly what the base computes until it is trained.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import (Checkpoint, Entry, atomic_output_dir, check_output_dir, check_processor_files,
                          copy_processor_files, special_token_ids, write_checkpoint, write_model_card)
from ..checkpoint.base_ref import BASE_FILE, base_record, write_adapter_only
from ..checkpoint.keys import ROUTER_PREFIX, is_adapter_key, lm_module_path
from ..errors import AwakerError
from ..model.config import CONFIG_NAME, AwakerConfig


@dataclass
class UpcyclePlan:
    base: Checkpoint
    config: AwakerConfig
    adapters: dict[str, tuple[int, ...]]  # hub key -> shape, in writing order
    dtype: torch.dtype
    max_shard_size: int

    @property
    def base_bytes(self) -> int:
        return self.base.total_bytes

    @property
    def adapter_params(self) -> int:
        return sum(math.prod(s) for s in self.adapters.values())

    @property
    def adapter_bytes(self) -> int:
        return self.adapter_params * self.dtype.itemsize

    def shard_estimate(self) -> int:
        return max(1, math.ceil((self.base_bytes + self.adapter_bytes) / self.max_shard_size))

    def summary(self) -> dict:
        base_params = sum(i.numel for i in self.base.tensors.values())
        return {
            "base": str(self.base.path),
            "base_tensors": len(self.base.tensors),
            "base_params": base_params,
            "base_bytes": self.base_bytes,
            "adapter_tensors": len(self.adapters),
            "adapter_params": self.adapter_params,
            "adapter_bytes": self.adapter_bytes,
            "adapter_dtype": str(self.dtype).removeprefix("torch."),
            "shards": self.shard_estimate(),
            "total_bytes": self.base_bytes + self.adapter_bytes,
            "awaker_config": self.config.to_dict(),
        }


def _span_token_ids(base: Checkpoint) -> dict[str, int]:
    """The tokens the routing span rule looks for, from this checkpoint's own config and tokenizer."""
    ids = special_token_ids(base.path, ["<|im_start|>", "<|im_end|>"])
    try:
        vision_start = base.family.token_ids(base.config)["vision_start_token_id"]
    except (KeyError, TypeError, ValueError):
        raise AwakerError(f"{base.path / 'config.json'}: no vision_start_token_id")
    return {"im_start": ids["<|im_start|>"], "im_end": ids["<|im_end|>"], "vision_start": vision_start}


def expected_linear_shape(base: Checkpoint, proj: str) -> tuple[int, int]:
    """[out, in] of a decoder linear, from the text config (head_dim given, or hidden / heads)."""
    text = base.text_config
    hidden = base.hidden_size
    try:
        heads, kv_heads = int(text["num_attention_heads"]), int(text.get("num_key_value_heads", text["num_attention_heads"]))
        head_dim = int(text.get("head_dim") or hidden // heads)
        inter = int(text["intermediate_size"])
    except (KeyError, TypeError, ValueError):
        raise AwakerError(f"{base.path / 'config.json'}: needs num_attention_heads and intermediate_size")
    return {"q_proj": (heads * head_dim, hidden), "k_proj": (kv_heads * head_dim, hidden),
            "v_proj": (kv_heads * head_dim, hidden), "o_proj": (hidden, heads * head_dim),
            "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}[proj]


def plan_upcycle(base_path: str | Path, config: AwakerConfig, max_shard_size: int) -> UpcyclePlan:
    """Check everything that can go wrong before a byte is written and list what would be written."""
    base = Checkpoint(base_path)
    if (base.path / CONFIG_NAME).exists() or any(is_adapter_key(k) for k in base.tensors):
        raise AwakerError(f"{base.path}: already an awaker model (upcycle a dense {base.family.label} checkpoint)")
    check_processor_files(base.path)
    config = dataclasses.replace(config, num_layers=base.num_layers, base_model=str(base_path)).validate()
    config = dataclasses.replace(config, span_token_ids=_span_token_ids(base), family=base.family.name)
    adapters: dict[str, tuple[int, ...]] = {}
    dtype = None
    for layer in range(base.num_layers):
        for proj in (*config.lora_targets, *config.moe_targets):
            path = lm_module_path(layer, proj)
            info = base.tensors.get(f"{path}.weight")
            if info is None:
                raise AwakerError(f"{base.path}: target module {proj} not found ({path}.weight is missing)")
            if not info.dtype.is_floating_point:
                raise AwakerError(f"{base.path}: {path}.weight is {str(info.dtype).removeprefix('torch.')}; "
                                  "upcycle needs a full-precision (float) checkpoint, not a quantized one")
            expected = expected_linear_shape(base, proj)
            if tuple(info.shape) != expected:
                raise AwakerError(f"{base.path}: {path}.weight has shape {tuple(info.shape)}, its config.json "
                                  f"implies {expected}")
            dtype = dtype or info.dtype
            out_features, in_features = info.shape
            if config.rank > min(out_features, in_features):
                raise AwakerError(f"--rank {config.rank} is larger than {proj}'s smaller side "
                                  f"({min(out_features, in_features)}): a LoRA cannot have more rank than its layer")
            if proj in config.lora_targets:
                adapters[f"{path}.lora_A"] = (config.rank, in_features)
                adapters[f"{path}.lora_B"] = (out_features, config.rank)
            else:
                adapters[f"{path}.lora_A"] = (config.num_slots, config.rank, in_features)
                adapters[f"{path}.lora_B"] = (config.num_slots, out_features, config.rank)
    hidden, routers = base.hidden_size, config.num_routers
    adapters[ROUTER_PREFIX + "norm_weight"] = (routers, hidden)
    adapters[ROUTER_PREFIX + "gate_weight"] = (routers, config.num_experts, hidden)
    adapters[ROUTER_PREFIX + "gate_bias"] = (routers, config.num_experts)
    return UpcyclePlan(base, config, adapters, dtype or torch.bfloat16, max_shard_size)


def _init_adapter(key: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator,
                  hidden: int) -> torch.Tensor:
    """Fresh adapter tensors: LoRA B zero, router norms one, LoRA A and router gates like a default
    nn.Linear (uniform within 1/sqrt(fan_in)), as peft and the release initialise them."""
    if key.endswith(".lora_B"):
        return torch.zeros(shape, dtype=dtype)
    if key == ROUTER_PREFIX + "norm_weight":
        return torch.ones(shape, dtype=dtype)
    fan_in = hidden if key == ROUTER_PREFIX + "gate_bias" else shape[-1]
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape, dtype=dtype).uniform_(-bound, bound, generator=gen)


def run_upcycle(plan: UpcyclePlan, out: str | Path, *, force: bool = False, seed: int = 0,
                progress: Callable[[int], None] | None = None, adapter_only: bool = False) -> dict:
    """Write the upcycled model into `out` atomically. progress(n_bytes) is called per tensor.
    adapter_only: the adapters and routers alone, with a record of the base (checkpoint/base_ref.py)."""
    check_output_dir(Path(out), force, inputs=[plan.base.path])
    gen = torch.Generator().manual_seed(seed)
    base, hidden = plan.base, plan.base.hidden_size
    entries = [] if adapter_only else [Entry(key, base.tensors[key].dtype, base.tensors[key].shape,
                                             source=base.tensors[key]) for key in base.ordered_keys()]
    record = base_record(base, Path(out)) if adapter_only else None
    entries += [Entry(key, plan.dtype, shape, make=functools.partial(_init_adapter, key, shape, plan.dtype, gen, hidden))
                for key, shape in plan.adapters.items()]
    with atomic_output_dir(out, force, inputs=[base.path]) as tmp:
        if adapter_only:
            shards = write_adapter_only(tmp, entries, record, base.family.disk_key, progress)
        else:
            shards = write_checkpoint(tmp, entries, plan.max_shard_size, progress, key_map=base.family.disk_key)
        shutil.copy2(base.path / "config.json", tmp / "config.json")
        plan.config.save(tmp)
        copied = copy_processor_files(base.path, tmp)
        cfg = plan.config
        write_model_card(tmp, "awaker LoRA-MoE model (freshly upcycled)", [
            f"Made by `awaker upcycle` from `{cfg.base_model}` "
            + ("(adapters only: the base is read from there, verified by a hash of its tensors)." if adapter_only
               else "(base tensors copied bit for bit)."),
            f"{cfg.num_experts} routed LoRA experts{' + 1 global expert' if cfg.global_expert else ''} of rank "
            f"{cfg.rank} (alpha {cfg.alpha:g}) on {', '.join(cfg.moe_targets)}; plain LoRA on "
            f"{', '.join(cfg.lora_targets) or 'nothing'}.",
            f"Routers: {cfg.num_routers} ({', '.join(cfg.router_names)} per layer), top-{cfg.top_k}, "
            f"combine `{cfg.combine}`, routed once per sequence from the prompt span.",
            "LoRA B is zero: this model computes exactly what its base computes until trained.",
        ], source=base.path, base_model=cfg.base_model)
    summary = plan.summary()
    files = [*shards, *copied, *([BASE_FILE] if adapter_only else [])]
    summary.update(output=str(Path(out)), shards=len(shards), files=sorted(files), adapter_only=adapter_only)
    return summary
