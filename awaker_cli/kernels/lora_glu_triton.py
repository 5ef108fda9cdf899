"""Triton fused gate/up LoRA-MoE + SiLU-gate; the specification is lora_glu_ref.py beside this file.

The shrink is lora_moe_triton's (x @ [A_gate | A_up]^T: one launch for both projections, rank 2r).
The expand here computes, per row tile and output tile n of the I intermediate features, both deltas
(gate: h[..., :r] @ B_gate[e]^T, up: h[..., r:] @ B_up[e]^T) over the slots the rows use, adds them to
the fused base product and writes silu(gate) * up: gate and up never go to memory, and one kernel
replaces two expands, the SiLU and the product. Inference only (no gradient).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import lora_moe_triton as lmt
from .lora_moe_triton import _any, _row_seq, _slot_rows


@triton.jit
def _glu_expand_kernel(
    h_ptr, bg_ptr, bu_ptr, y_ptr, base_ptr, ids_ptr, ew_ptr, gw_ptr, order_ptr,
    M, T, N, R, NUM_SLOTS, G, scaling, num_splits,
    shs, shc, shm, shk,  # h [splits, S, M, 2R] fp32: gate's rank first, then up's
    sbe, sbn, sbk,  # B_gate and B_up [E', N, R] (same strides)
    syb, syt, syn, sbb, sbt, sbn_base,
    sib, sij, sewb, sewj, sgw,
    NUM_ROUTED: tl.constexpr, NUM_COLS: tl.constexpr, HAS_ORDER: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < M
    seq, t = _row_seq(rows, row_ok, T, order_ptr, HAS_ORDER)
    n = pid_n * BN + tl.arange(0, BN)
    n_ok = n < N
    acc_g = tl.zeros((BM, BN), dtype=ACC_DTYPE)
    acc_u = tl.zeros((BM, BN), dtype=ACC_DTYPE)
    for e in range(0, NUM_SLOTS):
        used, col, wt = _slot_rows(e, seq, row_ok, ids_ptr, sib, sij, ew_ptr, sewb, sewj, gw_ptr, sgw, G,
                                       NUM_ROUTED, NUM_COLS, ACC_DTYPE)
        if _any(used):
            h_row = h_ptr + col.to(tl.int64) * shc + rows * shm
            for k0 in range(0, R, BK):
                k = k0 + tl.arange(0, BK)
                k_ok = k < R
                a_mask = used[:, None] & k_ok[None, :]
                a_g = tl.load(h_row[:, None] + k[None, :] * shk, mask=a_mask, other=0.0)
                a_u = tl.load(h_row[:, None] + (R + k[None, :]) * shk, mask=a_mask, other=0.0)
                for sp in range(1, num_splits):  # split order, always: deterministic
                    a_g += tl.load(h_row[:, None] + sp * shs + k[None, :] * shk, mask=a_mask, other=0.0)
                    a_u += tl.load(h_row[:, None] + sp * shs + (R + k[None, :]) * shk, mask=a_mask, other=0.0)
                b_off = e * sbe + k[:, None] * sbk + n[None, :] * sbn
                b_mask = k_ok[:, None] & n_ok[None, :]
                b_g = tl.load(bg_ptr + b_off, mask=b_mask, other=0.0)
                b_u = tl.load(bu_ptr + b_off, mask=b_mask, other=0.0)
                acc_g = tl.dot((a_g * wt[:, None]).to(DOT_DTYPE), b_g.to(DOT_DTYPE), acc_g,
                               input_precision=PRECISION, out_dtype=ACC_DTYPE)
                acc_u = tl.dot((a_u * wt[:, None]).to(DOT_DTYPE), b_u.to(DOT_DTYPE), acc_u,
                               input_precision=PRECISION, out_dtype=ACC_DTYPE)
    mask = row_ok[:, None] & n_ok[None, :]
    base = base_ptr + seq[:, None] * sbb + t[:, None] * sbt + n[None, :] * sbn_base
    out_ty = y_ptr.dtype.element_ty
    # round gate and up to the activations' dtype, then the SiLU, then the product: as the reference
    gate = (tl.load(base, mask=mask, other=0.0).to(ACC_DTYPE) + acc_g * scaling).to(out_ty).to(ACC_DTYPE)
    up = (tl.load(base + N * sbn_base, mask=mask, other=0.0).to(ACC_DTYPE) + acc_u * scaling).to(out_ty)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ty)
    tl.store(y_ptr + seq[:, None] * syb + t[:, None] * syt + n[None, :] * syn,
             (act.to(ACC_DTYPE) * up.to(ACC_DTYPE)).to(out_ty), mask=mask)


def lora_glu_triton(base_gu, x, lora_A, B_gate, B_up, expert_ids, expert_weights, global_weight, scaling, *,
                    plan=None, split_k=None):
    """Same arguments and result as lora_glu_ref; plan and split_k as lora_moe_triton's."""
    if B_gate.shape != B_up.shape or B_gate.stride() != B_up.stride():
        raise ValueError("B_gate and B_up must have the same shape and strides")
    Bsz, T, _ = x.shape
    N, R = B_gate.shape[1], B_gate.shape[2]
    y = torch.empty(Bsz, T, N, device=x.device, dtype=base_gu.dtype)
    if Bsz * T == 0:
        return y
    plan = plan.contiguous() if plan is not None else None
    rt = lmt._Slots(expert_ids, expert_weights, global_weight, plan, lora_A.shape[0])
    h = lmt._shrink(x, lora_A, lora_A.stride(), lora_A.shape[1], rt, split_k)  # [splits, S, M, 2R]
    M = Bsz * T
    BK = lmt._p2(R, 16, 64)
    if M >= 256:
        BM, BN = 64, 64
    else:  # decode: narrow output tiles until the programs fill the GPU
        BM, BN = lmt._p2(M, 16, 64), 64
        while BN > 16 and triton.cdiv(M, BM) * triton.cdiv(N, BN) < 2 * lmt._num_sms(x.device):
            BN //= 2
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _glu_expand_kernel[grid](
        h, B_gate, B_up, y, base_gu, M=M, T=T, N=N, R=R, NUM_SLOTS=rt.num_slots, scaling=float(scaling),
        num_splits=h.shape[0], shs=h.stride(0), shc=h.stride(1), shm=h.stride(2), shk=h.stride(3),
        sbe=B_gate.stride(0), sbn=B_gate.stride(1), sbk=B_gate.stride(2),
        syb=y.stride(0), syt=y.stride(1), syn=y.stride(2),
        sbb=base_gu.stride(0), sbt=base_gu.stride(1), sbn_base=base_gu.stride(2),
        BM=BM, BN=BN, BK=BK, num_warps=4, **rt.args(), **rt.weight_args(), **lmt._dot_args(x.dtype))
    return y
