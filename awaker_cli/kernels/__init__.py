"""Compute kernels behind the model's layers, each with its plain-PyTorch reference beside it.

`lora_moe` and `route` are the entry points the model uses, with `make_plans` computed once per
routing (per batch) for `lora_moe`'s `plan`; the generation engine's decode step also uses the fused
`add_rmsnorm`, `rope_kv_write` and `lora_glu`. They pick an implementation: Triton for CUDA tensors,
the torch reference otherwise; AWAKER_KERNELS=torch|triton forces one.
"""
from __future__ import annotations

import functools
import os

import torch

from ..errors import AwakerError
from .lora_glu_ref import lora_glu_ref
from .lora_moe_ref import lora_moe_ref
from .norm_ref import add_rmsnorm_ref
from .plan import make_plans
from .rope_ref import rope_kv_write_ref
from .routing_ref import routing_ref

__all__ = ["lora_moe", "lora_glu", "add_rmsnorm", "rope_kv_write", "route", "make_plans", "backend_for"]


def backend_for(t: torch.Tensor) -> str:
    forced = os.environ.get("AWAKER_KERNELS", "").strip().lower()
    if forced in ("torch", "triton"):
        return forced
    if forced:
        raise AwakerError(f"AWAKER_KERNELS must be 'torch' or 'triton', not {forced!r}")
    return "triton" if t.is_cuda and _triton_available() else "torch"


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def lora_moe(base_out, x, lora_A, lora_B, expert_ids, expert_weights, global_weight, scaling, *, plan=None):
    """base_out + scaling * (routed experts + global expert) @ x; see lora_moe_ref for the shapes.

    plan: optional, `make_plans(expert_ids_all_routers, lora_A.shape[0])[r]` for the router r that
    chose expert_ids ([B] int32, the sequences grouped by expert). Compute the plans once per routing
    (per batch) and reuse them in every layer and decode step; they only speed up the Triton path
    (the torch reference ignores them) and never change the result. A plan indexes the batch's
    sequences: recompute it when the batch changes (e.g. after Routing.select).
    With Triton and no gradient needed, the delta is added into base_out in place (when contiguous)
    and base_out is returned: do not rely on base_out keeping its value.
    """
    if backend_for(x) == "triton":
        from .lora_moe_triton import lora_moe_triton

        return lora_moe_triton(base_out, x, lora_A, lora_B, expert_ids, expert_weights, global_weight, scaling,
                               plan=plan)
    return lora_moe_ref(base_out, x, lora_A, lora_B, expert_ids, expert_weights, global_weight, scaling)


def route(span_mean, norm_weight, gate_weight, gate_bias, *, eps, temperature, top_k, noise=None):
    """All routers at once; see routing_ref for the shapes."""
    if backend_for(span_mean) == "triton":
        from .routing_triton import routing_triton

        return routing_triton(span_mean, norm_weight, gate_weight, gate_bias,
                              eps=eps, temperature=temperature, top_k=top_k, noise=noise)
    return routing_ref(span_mean, norm_weight, gate_weight, gate_bias,
                       eps=eps, temperature=temperature, top_k=top_k, noise=noise)


def lora_glu(base_gu, x, lora_A, B_gate, B_up, expert_ids, expert_weights, global_weight, scaling, *, plan=None):
    """silu(gate) * up of an MLP whose gate and up projections share input and router; see lora_glu_ref.
    Inference only."""
    if backend_for(x) == "triton":
        from .lora_glu_triton import lora_glu_triton

        return lora_glu_triton(base_gu, x, lora_A, B_gate, B_up, expert_ids, expert_weights, global_weight,
                               scaling, plan=plan)
    return lora_glu_ref(base_gu, x, lora_A, B_gate, B_up, expert_ids, expert_weights, global_weight, scaling)


def add_rmsnorm(x, delta, weight, eps: float):
    """(h, y): the residual sum x + delta (x when delta is None) and its RMSNorm; see norm_ref."""
    if backend_for(x) == "triton":
        from .norm_triton import add_rmsnorm_triton

        return add_rmsnorm_triton(x, delta, weight, eps)
    return add_rmsnorm_ref(x, delta, weight, eps)


def rope_kv_write(qkv, cos, sin, k_cache, v_cache, slot, heads: int, kv_heads: int):
    """Rotated queries [B, heads, 1, D]; rotated keys and values written to the cache at `slot`; see rope_ref."""
    if backend_for(qkv) == "triton":
        from .rope_triton import rope_kv_write_triton

        return rope_kv_write_triton(qkv, cos, sin, k_cache, v_cache, slot, heads, kv_heads)
    return rope_kv_write_ref(qkv, cos, sin, k_cache, v_cache, slot, heads, kv_heads)
