"""Segment planning for the LoRA-MoE kernels: which order the sequences of a batch are visited in.

Routing is fixed per sequence for a whole request (docs/design.md section 1), so the grouping of sequences
by expert is computed once per batch, for all routers at once, and reused by every layer and every
decode step. A plan is an order of the sequences in which those routed to the same expert(s) are
adjacent: the kernels tile that order, so a tile of rows needs few expert slots, and each slot's
weights are read once per tile rather than once per sequence. The kernels find the slots a tile uses
on the device, so a plan is never required for correctness and needs no host synchronisation.
"""
from __future__ import annotations

import torch


def make_plans(expert_ids: torch.Tensor, num_slots: int) -> torch.Tensor:
    """expert_ids [B, R, k] (the routing of R routers) -> plans [R, B] int32.

    plans[r] is the `plan` argument of `lora_moe` for every linear that router r drives: the sequence
    indices stably sorted by their expert combination (first routed expert, then the second, ...).
    num_slots = lora_A.shape[0] is the radix of that sort key. Pure device ops, no synchronisation.
    """
    if expert_ids.dim() != 3:
        raise ValueError(f"expert_ids must be [B, R, k], got {tuple(expert_ids.shape)}")
    ids = expert_ids.long()
    key = ids[..., 0]
    for j in range(1, ids.shape[-1]):
        key = key * num_slots + ids[..., j]
    order = torch.sort(key.transpose(0, 1), dim=1, stable=True).indices  # [R, B]
    return order.to(torch.int32).contiguous()
