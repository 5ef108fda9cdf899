"""Plain-PyTorch reference for rope fused with the KV-cache write of one new token per row (the
specification of rope_triton.py): exactly the engine's split, rotary embedding and index_copy.

qkv [B, 1, (heads + 2 kv_heads) * D] (the fused q|k|v projection), cos/sin [B, 1, D]; the rotated keys
and the values go to k_cache/v_cache [B, kv_heads, L, D] at cache slot `slot` ([1] int64, on the
device); returns the rotated queries [B, heads, 1, D].
"""
from __future__ import annotations

import torch


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """transformers' Qwen2-VL apply_rotary_pos_emb (the engine's prefill uses that one), op for op."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


def rope_kv_write_ref(qkv, cos, sin, k_cache, v_cache, slot, heads: int, kv_heads: int) -> torch.Tensor:
    batch, length, _ = qkv.shape
    dim = k_cache.shape[-1]
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q = q.view(batch, length, heads, dim).transpose(1, 2)
    k = k.view(batch, length, kv_heads, dim).transpose(1, 2)
    v = v.view(batch, length, kv_heads, dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k_cache.index_copy_(2, slot, k)
    v_cache.index_copy_(2, slot, v)
    return q
