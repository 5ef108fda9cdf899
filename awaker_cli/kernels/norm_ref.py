"""Plain-PyTorch reference for the fused residual add + RMSNorm (the specification of norm_triton.py).

    h = x + delta            (delta None: h = x), rounded to x's dtype as torch's add rounds it
    y = weight * (h / sqrt(mean(h^2) + eps))     computed in fp32, cast to x's dtype before the weight

exactly the ops of Qwen2(-VL)'s RMSNorm after the decoder's residual add.
"""
from __future__ import annotations

import torch


def add_rmsnorm_ref(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """x, delta [..., H]; weight [H]. Returns (h, y), both [..., H] in x's dtype."""
    h = x if delta is None else x + delta
    hf = h.to(torch.float32)
    variance = hf.pow(2).mean(-1, keepdim=True)
    return h, weight * (hf * torch.rsqrt(variance + eps)).to(h.dtype)
