"""Plain-PyTorch reference for the LoRA-MoE linear: the specification the Triton kernel must match.

For every sequence b of the batch, with its chosen experts ids[b, :] and their weights w[b, :]:

    out[b] = base_out[b] + scaling * ( sum_j w[b, j] * B[ids[b, j]] @ A[ids[b, j]] @ x[b]
                                       + global_weight[b] * B[G] @ A[G] @ x[b] )

where G = A.shape[0] - 1 is the global expert (only when global_weight is given). A plain LoRA is the
same call with one expert, ids = 0 and weight 1.
"""
from __future__ import annotations

import torch


def lora_moe_ref(
    base_out: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    global_weight: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """base_out [B, T, out], x [B, T, in], lora_A [E', r, in], lora_B [E', out, r],
    expert_ids [B, k] (int64), expert_weights [B, k] (fp32), global_weight [B] (fp32) or None.
    Returns base_out + delta (a new tensor; differentiable in x, A, B and both weight tensors)."""
    delta = None
    for j in range(expert_ids.shape[1]):
        A = lora_A[expert_ids[:, j]]  # [B, r, in]
        B = lora_B[expert_ids[:, j]]  # [B, out, r]
        term = torch.bmm(torch.bmm(x, A.transpose(1, 2)), B.transpose(1, 2))
        term = term * expert_weights[:, j].to(term.dtype)[:, None, None]
        delta = term if delta is None else delta + term
    if global_weight is not None:
        term = (x @ lora_A[-1].T) @ lora_B[-1].T
        term = term * global_weight.to(term.dtype)[:, None, None]
        delta = term if delta is None else delta + term
    if delta is None:
        return base_out
    return base_out + scaling * delta
