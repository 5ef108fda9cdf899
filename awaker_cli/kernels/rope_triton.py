"""Triton rope fused with the KV-cache write; the specification is rope_ref.py beside this file.

One program per (row, head) of the fused q|k|v output: a query head is rotated into q, a key head
rotated into the cache, a value head copied into it, at the slot read on the device (so a captured
decode step writes the right slot on every replay). One kernel instead of about twelve (the rotary
muls, negations, concatenations and adds, two index_copy).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, slot_ptr,
                    sqkv, scos, ssin, sqb, sqh, skb, skh, sks, svb, svh, svs,
                    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, HALF)
    src = qkv_ptr + b * sqkv + head * D
    lo = tl.load(src + d).to(tl.float32)
    hi = tl.load(src + HALF + d).to(tl.float32)
    slot = tl.load(slot_ptr)
    if head < HEADS + KV_HEADS:  # rotate: [lo, hi] * cos + [-hi, lo] * sin
        c_lo = tl.load(cos_ptr + b * scos + d).to(tl.float32)
        c_hi = tl.load(cos_ptr + b * scos + HALF + d).to(tl.float32)
        s_lo = tl.load(sin_ptr + b * ssin + d).to(tl.float32)
        s_hi = tl.load(sin_ptr + b * ssin + HALF + d).to(tl.float32)
        out_lo = lo * c_lo - hi * s_lo
        out_hi = hi * c_hi + lo * s_hi
        if head < HEADS:
            dst = q_ptr + b * sqb + head * sqh
        else:
            dst = k_ptr + b * skb + (head - HEADS) * skh + slot * sks
        tl.store(dst + d, out_lo.to(q_ptr.dtype.element_ty))
        tl.store(dst + HALF + d, out_hi.to(q_ptr.dtype.element_ty))
    else:
        dst = v_ptr + b * svb + (head - HEADS - KV_HEADS) * svh + slot * svs
        tl.store(dst + d, lo.to(v_ptr.dtype.element_ty))
        tl.store(dst + HALF + d, hi.to(v_ptr.dtype.element_ty))


def rope_kv_write_triton(qkv, cos, sin, k_cache, v_cache, slot, heads: int, kv_heads: int) -> torch.Tensor:
    """Same arguments and result as rope_kv_write_ref (one new token per row)."""
    batch, length, _ = qkv.shape
    dim = k_cache.shape[-1]
    if length != 1 or dim % 2 or triton.next_power_of_2(dim // 2) != dim // 2:
        raise ValueError("rope_kv_write_triton: one token per row and a power-of-two head size")
    qkv2, cos2, sin2 = qkv[:, 0], cos[:, 0], sin[:, 0]
    for t in (qkv2, cos2, sin2):
        if t.stride(-1) != 1:
            raise ValueError("rope_kv_write_triton: the last dimension must be contiguous")
    q = torch.empty(batch, heads, 1, dim, device=qkv.device, dtype=qkv.dtype)
    _rope_kv_kernel[(batch, heads + 2 * kv_heads)](
        qkv2, cos2, sin2, q, k_cache, v_cache, slot, qkv2.stride(0), cos2.stride(0), sin2.stride(0),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HEADS=heads, KV_HEADS=kv_heads, D=dim, HALF=dim // 2, num_warps=1)
    return q
