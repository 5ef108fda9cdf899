"""Plain-PyTorch reference for routing: every router of the model at once, from one vector per sequence.

Router r (DESIGN.md section 1): RMSNorm(eps, computed in fp32, cast back, times norm_weight[r])
-> Linear(gate_weight[r], gate_bias[r]) -> softmax(logits / temperature) -> top-k.
Probabilities are returned in fp32.
"""
from __future__ import annotations

import torch


def routing_ref(
    span_mean: torch.Tensor,
    norm_weight: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
    *,
    eps: float,
    temperature: float,
    top_k: int,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """span_mean [B, H] (model dtype), norm_weight [R, H], gate_weight [R, E, H], gate_bias [R, E],
    noise [B, R, E] added to the logits (training) or None.
    Returns (expert_ids [B, R, k] int64, probs [B, R, k] fp32); probs keep their gradient."""
    x32 = span_mean.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(span_mean.dtype)
    normed = normed[:, None, :] * norm_weight[None]  # [B, R, H]
    logits = torch.einsum("brh,reh->bre", normed, gate_weight) + gate_bias[None]
    logits = logits.float()
    if noise is not None:
        logits = logits + noise
    probs = torch.softmax(logits / temperature, dim=-1)
    top_p, top_ids = probs.topk(top_k, dim=-1)
    return top_ids, top_p
