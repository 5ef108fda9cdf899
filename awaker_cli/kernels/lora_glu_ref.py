"""Plain-PyTorch reference for the fused gate/up LoRA-MoE + SiLU-gate (the specification of
lora_glu_triton.py): the MLP's gate_proj and up_proj share their input and their router, so their
base products come from one matmul (base_gu = x @ [W_gate; W_up]^T) and their shrinks from one A
(lora_A = [A_gate | A_up] stacked along the rank); the result is what the MLP hands to down_proj:

    silu(gate_proj(x)) * up_proj(x)

with gate_proj(x) = base_gu[..., :I] + LoRA-MoE(A_gate, B_gate), up_proj(x) = base_gu[..., I:] + ...
"""
from __future__ import annotations

import torch.nn.functional as F

from .lora_moe_ref import lora_moe_ref


def lora_glu_ref(base_gu, x, lora_A, B_gate, B_up, expert_ids, expert_weights, global_weight, scaling):
    """base_gu [B, T, 2I], x [B, T, in], lora_A [E', 2r, in], B_gate/B_up [E', I, r]; routing as
    lora_moe_ref. Returns [B, T, I] in base_gu's dtype."""
    inter, r = B_gate.shape[1], B_gate.shape[2]
    gate = lora_moe_ref(base_gu[..., :inter], x, lora_A[:, :r], B_gate, expert_ids, expert_weights, global_weight,
                        scaling)
    up = lora_moe_ref(base_gu[..., inter:], x, lora_A[:, r:], B_up, expert_ids, expert_weights, global_weight,
                      scaling)
    return F.silu(gate) * up
