"""Plain-PyTorch reference for routing: every router of the model at once, from one vector per sequence.

Router r (docs/design.md section 1): RMSNorm(eps, computed in fp32, cast back, times norm_weight[r])
-> Linear(gate_weight[r], gate_bias[r]) -> softmax(logits / temperature) -> top-k.
Probabilities are returned in fp32.

The steps are also exported one by one (router_inputs, router_logits, router_probs) so that offline
tools (awaker stats, merge) use this one definition of the router math instead of a copy of it.
"""
from __future__ import annotations

import torch


def router_inputs(span_mean: torch.Tensor, norm_weight: torch.Tensor, *, eps: float) -> torch.Tensor:
    """[B, R, H] what each router's gate sees: RMSNorm of span_mean [B, H] (fp32 inside, cast back to
    span_mean's dtype) times norm_weight [R, H]."""
    x32 = span_mean.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(span_mean.dtype)
    return normed[:, None, :] * norm_weight[None]


def router_logits(span_mean: torch.Tensor, norm_weight: torch.Tensor, gate_weight: torch.Tensor,
                  gate_bias: torch.Tensor, *, eps: float) -> torch.Tensor:
    """[B, R, E] fp32 gate logits of every router (before noise and temperature)."""
    normed = router_inputs(span_mean, norm_weight, eps=eps)
    logits = torch.einsum("brh,reh->bre", normed, gate_weight) + gate_bias[None]
    return logits.float()


def router_probs(span_mean: torch.Tensor, norm_weight: torch.Tensor, gate_weight: torch.Tensor,
                 gate_bias: torch.Tensor, *, eps: float, temperature: float,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
    """[B, R, E] fp32 probability of every expert of every router (routing_ref keeps the top k)."""
    logits = router_logits(span_mean, norm_weight, gate_weight, gate_bias, eps=eps)
    if noise is not None:
        logits = logits + noise
    return torch.softmax(logits / temperature, dim=-1)


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
    probs = router_probs(span_mean, norm_weight, gate_weight, gate_bias, eps=eps, temperature=temperature,
                         noise=noise)
    top_p, top_ids = probs.topk(top_k, dim=-1)
    return top_ids, top_p
