"""Triton LoRA-MoE linear; the specification is lora_moe_ref.py beside this file.

Layout. The B*T tokens are the rows, visited in the order of `plan` (sequences grouped by expert,
see plan.py). Every row has S = k + has_global *columns*: column j < k is its j-th routed choice
ids[b, j], column k the global expert (the last slot). The low-rank activations are kept per column,
h[j, row] = x[row] @ A[slot]^T, in fp32 and unweighted (the backward needs them for dw).

Kernels (docs/design.md section 6):
- shrink: one program = one row tile x one rank tile x one K split x ONE slot; it only touches the
  rows of its tile that use the slot (found on the device from ids: no host sync, a static grid that
  CUDA graphs can capture) and exits at once when none does. A slot's A is thus read once per row
  tile, however many sequences share it. Split-K spreads decode over the GPU: each K split writes its
  own partial sums (h is [splits, S, M, N]), never atomics, so no buffer needs zeroing first and the
  reduction runs in one fixed order (results are bit-identical run to run).
- expand: one program = one row tile x one output tile; it loops over the slots its rows use, sums
  the K splits' partials of h in split order, and accumulates (weight * h) @ B[slot]^T, weights (routed p's and global weight) folded into the
  A-operand, scaling and base_out added in the epilogue, so the delta never goes to memory.
- backward re-uses both with transposed roles (g = dy @ B is a shrink, dx = g @ A an expand) plus
  `_wgrad_kernel` for dA and dB; dw and the global weight's gradient are sum_t <g, h>.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable
from triton.runtime.interpreter import InterpretedFunction


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _row_seq(rows, row_ok, T, order_ptr, HAS_ORDER: tl.constexpr):
    """Sequence and token index of each row; rows are tiled in plan order."""
    i = rows // T
    t = rows - i * T
    if HAS_ORDER:
        seq = tl.load(order_ptr + i, mask=row_ok, other=0)
    else:
        seq = i
    return seq.to(tl.int64), t.to(tl.int64)  # int64: seq * stride overflows int32 on long prefill


@triton.jit
def _col_uses(j, e, seq, row_ok, ids_ptr, sib, sij, G, NUM_ROUTED: tl.constexpr):
    """Rows whose column j is slot e (column NUM_ROUTED is the global expert, slot G)."""
    if j < NUM_ROUTED:
        sel = row_ok & (tl.load(ids_ptr + seq * sib + j * sij, mask=row_ok, other=-1) == e)
    else:
        sel = row_ok & (e == G)
    return sel


@triton.jit
def _slot_rows(e, seq, row_ok, ids_ptr, sib, sij, w_ptr, swb, swj, gw_ptr, sgw, G,
               NUM_ROUTED: tl.constexpr, NUM_COLS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """For slot e: which rows use it, the column that holds their h, and their total weight (a slot
    chosen twice by one row gets both weights; its h columns are then identical)."""
    used = row_ok & (seq < 0)
    col = (seq * 0).to(tl.int32)
    wt = (seq * 0).to(ACC_DTYPE)
    for j in tl.static_range(NUM_COLS):
        sel = _col_uses(j, e, seq, row_ok, ids_ptr, sib, sij, G, NUM_ROUTED)
        if j < NUM_ROUTED:
            wj = tl.load(w_ptr + seq * swb + j * swj, mask=sel, other=0.0).to(ACC_DTYPE)
        else:
            wj = tl.load(gw_ptr + seq * sgw, mask=sel, other=0.0).to(ACC_DTYPE)
        used = used | sel
        col = tl.where(sel, j, col)
        wt += wj
    return used, col, wt


@triton.jit
def _any(mask):
    return tl.max(mask.to(tl.int32), axis=0) > 0


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _shrink_kernel(
    x_ptr, w_ptr, h_ptr, ids_ptr, order_ptr,
    M, T, N, K, K_PER_SPLIT, G,
    sxb, sxt, sxk,  # x rows [B, T, K]
    swe, swn, swk,  # weight element (slot, n, k): A[e, n, k] forward, B[e, k, n] backward
    shs, shc, shm, shn,  # h [splits, S, M, N] fp32: one partial sum per K split
    sib, sij,
    NUM_ROUTED: tl.constexpr, NUM_COLS: tl.constexpr, HAS_ORDER: tl.constexpr,
    SPLIT_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """h[j, row, :] (+)= x[row] @ W[e]^T for the rows of this tile whose column j is slot e."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1) // SPLIT_K
    pid_k = tl.program_id(1) % SPLIT_K
    e = tl.program_id(2)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < M
    seq, t = _row_seq(rows, row_ok, T, order_ptr, HAS_ORDER)
    used = row_ok & (seq < 0)
    for j in tl.static_range(NUM_COLS):
        used = used | _col_uses(j, e, seq, row_ok, ids_ptr, sib, sij, G, NUM_ROUTED)
    if _any(used):  # most (tile, slot) programs of a decode batch stop here
        n = pid_n * BN + tl.arange(0, BN)
        n_ok = n < N
        x_row = x_ptr + seq * sxb + t * sxt
        w_e = w_ptr + e * swe
        acc = tl.zeros((BM, BN), dtype=ACC_DTYPE)
        k_lo = pid_k * K_PER_SPLIT
        for k0 in range(k_lo, tl.minimum(k_lo + K_PER_SPLIT, K), BK):
            k = k0 + tl.arange(0, BK)
            k_ok = k < K
            xt = tl.load(x_row[:, None] + k[None, :] * sxk, mask=used[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_e + k[:, None] * swk + n[None, :] * swn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(xt.to(DOT_DTYPE), wt.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        for j in tl.static_range(NUM_COLS):
            sel = _col_uses(j, e, seq, row_ok, ids_ptr, sib, sij, G, NUM_ROUTED)
            ptrs = h_ptr + pid_k * shs + j * shc + rows[:, None] * shm + n[None, :] * shn
            tl.store(ptrs, acc, mask=sel[:, None] & n_ok[None, :])  # every (split, column, row) once


@triton.jit
def _expand_kernel(
    h_ptr, w_ptr, y_ptr, base_ptr, ids_ptr, ew_ptr, gw_ptr, order_ptr,
    M, T, N, K, NUM_SLOTS, G, scaling, num_splits,
    shs, shc, shm, shk,  # h [splits, S, M, K] fp32: the shrink's K-split partials, summed here
    swe, swn, swk,  # weight element (slot, n, k): B[e, n, k] forward, A[e, k, n] backward
    syb, syt, syn, sbb, sbt, sbn,
    sib, sij, sewb, sewj, sgw,
    NUM_ROUTED: tl.constexpr, NUM_COLS: tl.constexpr, HAS_ORDER: tl.constexpr, HAS_BASE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """y[row] = base[row] + scaling * sum_slots (weight * h[col, row]) @ W[e]^T."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < M
    seq, t = _row_seq(rows, row_ok, T, order_ptr, HAS_ORDER)
    n = pid_n * BN + tl.arange(0, BN)
    n_ok = n < N
    acc = tl.zeros((BM, BN), dtype=ACC_DTYPE)
    for e in range(0, NUM_SLOTS):
        used, col, wt = _slot_rows(e, seq, row_ok, ids_ptr, sib, sij, ew_ptr, sewb, sewj, gw_ptr, sgw, G,
                                   NUM_ROUTED, NUM_COLS, ACC_DTYPE)
        if _any(used):  # slots no row of this tile uses cost a few loads of ids, no weights
            h_row = h_ptr + col.to(tl.int64) * shc + rows * shm
            w_e = w_ptr + e * swe
            for k0 in range(0, K, BK):
                k = k0 + tl.arange(0, BK)
                k_ok = k < K
                a_mask = used[:, None] & k_ok[None, :]
                a = tl.load(h_row[:, None] + k[None, :] * shk, mask=a_mask, other=0.0)
                for sp in range(1, num_splits):  # split order, always: deterministic
                    a += tl.load(h_row[:, None] + sp * shs + k[None, :] * shk, mask=a_mask, other=0.0)
                a = a * wt[:, None]  # routed p / global weight applied here: one dot per slot
                b = tl.load(w_e + k[:, None] * swk + n[None, :] * swn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    out = acc * scaling
    mask = row_ok[:, None] & n_ok[None, :]
    if HAS_BASE:  # the epilogue adds the base output: y may alias base (in-place inference)
        out += tl.load(base_ptr + seq[:, None] * sbb + t[:, None] * sbt + n[None, :] * sbn, mask=mask,
                       other=0.0).to(ACC_DTYPE)
    tl.store(y_ptr + seq[:, None] * syb + t[:, None] * syt + n[None, :] * syn, out, mask=mask)


@triton.jit
def _wgrad_kernel(
    p_ptr, q_ptr, c_ptr, ids_ptr, ew_ptr, gw_ptr, order_ptr,
    M, T, DM, DN, G, scaling,
    spa, spb, spc,  # P: columns [S, M, DM] if P_IS_COLS else rows [B, T, DM]
    sqa, sqb, sqc,  # Q: rows [B, T, DN] if P_IS_COLS else columns [S, M, DN]
    sce, scm, scn,  # C [E', DM, DN]
    sib, sij, sewb, sewj, sgw,
    NUM_ROUTED: tl.constexpr, NUM_COLS: tl.constexpr, HAS_ORDER: tl.constexpr, P_IS_COLS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """C[e] = sum over the rows using slot e of P[row]^T Q[row], the column side times scaling*weight.
    dA[e] = (s w g)^T x (P = g columns, Q = x); dB[e] = dy^T (s w h) (P = dy, Q = h columns)."""
    num_n = tl.cdiv(DN, BN)
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    e = tl.program_id(1)
    m = pid_m * BM + tl.arange(0, BM)
    n = pid_n * BN + tl.arange(0, BN)
    m_ok = m < DM
    n_ok = n < DN
    acc = tl.zeros((BM, BN), dtype=ACC_DTYPE)
    for r0 in range(0, M, BK):  # the reduction runs over the token rows
        rows = r0 + tl.arange(0, BK)
        row_ok = rows < M
        seq, t = _row_seq(rows, row_ok, T, order_ptr, HAS_ORDER)
        used, col, wt = _slot_rows(e, seq, row_ok, ids_ptr, sib, sij, ew_ptr, sewb, sewj, gw_ptr, sgw, G,
                                   NUM_ROUTED, NUM_COLS, ACC_DTYPE)
        if _any(used):  # rows are grouped by sequence, so most row tiles use one routed slot
            wt = wt * scaling
            if P_IS_COLS:
                p = tl.load(p_ptr + col.to(tl.int64)[None, :] * spa + rows[None, :] * spb + m[:, None] * spc,
                            mask=m_ok[:, None] & used[None, :], other=0.0) * wt[None, :]
                q = tl.load(q_ptr + seq[:, None] * sqa + t[:, None] * sqb + n[None, :] * sqc,
                            mask=used[:, None] & n_ok[None, :], other=0.0)
            else:
                p = tl.load(p_ptr + seq[None, :] * spa + t[None, :] * spb + m[:, None] * spc,
                            mask=m_ok[:, None] & used[None, :], other=0.0)
                q = tl.load(q_ptr + col.to(tl.int64)[:, None] * sqa + rows[:, None] * sqb + n[None, :] * sqc,
                            mask=used[:, None] & n_ok[None, :], other=0.0) * wt[:, None]
            acc = tl.dot(p.to(DOT_DTYPE), q.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    tl.store(c_ptr + e * sce + m[:, None] * scm + n[None, :] * scn, acc,
             mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launch configuration (heuristics, no autotuning: launches depend on shapes only)
# ----------------------------------------------------------------------------------------------

_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
       torch.float64: tl.float64}
_SMS: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def _dot_args(dtype: torch.dtype) -> dict:
    # The interpreter multiplies 16-bit floats as their raw bits (numpy has no bf16): up-cast there.
    # bf16/fp16 -> fp32 is exact, so it equals the tensor-core product with fp32 accumulation.
    if isinstance(_shrink_kernel, InterpretedFunction) and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    # fp32 inputs get a true fp32 product (torch's default matmul), not TF32.
    return dict(DOT_DTYPE=_TL[dtype], ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
                PRECISION="ieee" if dtype in (torch.float32, torch.float64) else "tf32")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32  # fp64 only for gradient tests


def _empty(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """Every output buffer comes from here (tests poison it with NaN to catch unwritten elements)."""
    return torch.empty(shape, device=like.device, dtype=dtype or like.dtype)


def _p2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

class _Slots:
    """The expert choice of one call (ids, weights, plan) as kernel arguments."""

    def __init__(self, ids, ew, gw, order, num_slots):
        self.ids, self.ew, self.order = ids, ew, order
        self.k = ids.shape[1]
        self.has_global = gw is not None
        self.gw = gw if gw is not None else ew  # any valid pointer; never read without a global
        self.num_cols = self.k + int(self.has_global)
        self.num_slots = num_slots
        self.G = num_slots - 1 if self.has_global else -1

    def args(self):
        return dict(ids_ptr=self.ids, order_ptr=self.order if self.order is not None else self.ids,
                    sib=self.ids.stride(0), sij=self.ids.stride(1), G=self.G,
                    NUM_ROUTED=self.k, NUM_COLS=self.num_cols, HAS_ORDER=self.order is not None)

    def weight_args(self):
        return dict(ew_ptr=self.ew, gw_ptr=self.gw, sewb=self.ew.stride(0), sewj=self.ew.stride(1),
                    sgw=self.gw.stride(0))


def _shrink(x, w, w_strides, N, rt: _Slots, split_k=None):
    """h [splits, S, B*T, N] fp32 with sum_s h[s, j, row] = x[row] @ W[slot of column j]^T; w_strides =
    (slot, n, k). _expand takes the partials as they are; _reduce_splits sums them (backward)."""
    Bsz, T, K = x.shape
    M = Bsz * T
    if M >= 256:  # prefill / training: a plain tensor-core GEMM tiling
        BM, BN, BK = 64, _p2(N, 16, 128), 64
    else:  # decode: few rows, bandwidth-bound: wide K steps, and split K below
        BM, BN, BK = _p2(M, 16, 64), _p2(N, 16, 64), 128 if x.element_size() <= 2 else 64
    m_tiles, n_tiles = triton.cdiv(M, BM), triton.cdiv(N, BN)
    if split_k is None:  # split K until the *active* (tile, slot) programs fill the GPU twice over
        active = min(rt.num_slots, Bsz * rt.num_cols) if m_tiles == 1 else rt.num_cols
        split_k = min(triton.cdiv(K, BK), triton.cdiv(2 * _num_sms(x.device), m_tiles * n_tiles * active))
    k_per_split = triton.cdiv(triton.cdiv(K, max(1, split_k)), BK) * BK
    split_k = triton.cdiv(K, k_per_split)
    h = _empty((split_k, rt.num_cols, M, N), x, _acc_dtype(x.dtype))  # fully written: no memset
    grid = (m_tiles, n_tiles * split_k, rt.num_slots)
    _shrink_kernel[grid](
        x, w, h, M=M, T=T, N=N, K=K, K_PER_SPLIT=k_per_split,
        sxb=x.stride(0), sxt=x.stride(1), sxk=x.stride(2), swe=w_strides[0], swn=w_strides[1], swk=w_strides[2],
        shs=h.stride(0), shc=h.stride(1), shm=h.stride(2), shn=h.stride(3),
        SPLIT_K=split_k, BM=BM, BN=BN, BK=BK, num_warps=8 if BM * BN >= 8192 else 4, **rt.args(), **_dot_args(x.dtype))
    return h


def _reduce_splits(h: torch.Tensor) -> torch.Tensor:
    """[splits, S, M, N] partials -> [S, M, N], added in split order as _expand_kernel adds them."""
    out = h[0]
    for part in h[1:]:
        out = out + part
    return out


def _expand(h, w, w_strides, N, y, base, scaling, rt: _Slots, T, act: torch.dtype):
    """y[row] = base[row] + scaling * sum_j weight_j * h[j, row] @ W[slot_j]^T  (y may be base); h is
    [splits, S, M, K] (the shrink's partials) or [S, M, K].
    The products run in the activations' dtype `act` (as autocast would with fp32 master weights)."""
    if h.dim() == 3:
        h = h[None]
    M, K = h.shape[2], h.shape[3]
    BK = _p2(K, 16, 64)
    if M >= 256:  # prefill / training
        BM, BN = 64, 128
    else:  # decode: narrow output tiles until the programs fill the GPU (o/down: out = 3584 only)
        BM, BN = _p2(M, 16, 64), 64
        while BN > 16 and triton.cdiv(M, BM) * triton.cdiv(N, BN) < 2 * _num_sms(h.device):
            BN //= 2
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    b = base if base is not None else y
    _expand_kernel[grid](
        h, w, y, b, M=M, T=T, N=N, K=K, NUM_SLOTS=rt.num_slots, scaling=float(scaling), num_splits=h.shape[0],
        shs=h.stride(0), shc=h.stride(1), shm=h.stride(2), shk=h.stride(3),
        swe=w_strides[0], swn=w_strides[1], swk=w_strides[2],
        syb=y.stride(0), syt=y.stride(1), syn=y.stride(2), sbb=b.stride(0), sbt=b.stride(1), sbn=b.stride(2),
        HAS_BASE=base is not None, BM=BM, BN=BN, BK=BK, num_warps=8 if BN == 128 else 4,
        **rt.args(), **rt.weight_args(), **_dot_args(act))
    return y


def _wgrad(p, q, p_is_cols, out, scaling, rt: _Slots, T):
    """out[e] = sum_rows P^T Q over the rows using slot e (see _wgrad_kernel)."""
    E, DM, DN = out.shape
    M = (p if p_is_cols else q).shape[1]
    BM, BN, BK = _p2(DM, 16, 128), _p2(DN, 16, 128), 32
    grid = (triton.cdiv(DM, BM) * triton.cdiv(DN, BN), E)
    _wgrad_kernel[grid](
        p, q, out, M=M, T=T, DM=DM, DN=DN, scaling=float(scaling),
        spa=p.stride(0), spb=p.stride(1), spc=p.stride(2), sqa=q.stride(0), sqb=q.stride(1), sqc=q.stride(2),
        sce=out.stride(0), scm=out.stride(1), scn=out.stride(2),
        P_IS_COLS=p_is_cols, BM=BM, BN=BN, BK=BK, num_warps=8 if BM * BN >= 16384 else 4,
        **rt.args(), **rt.weight_args(), **_dot_args((q if p_is_cols else p).dtype))  # activations' dtype
    return out


class _LoraMoEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base_out, x, A, B, ids, ew, gw, scaling, order, split_k):
        rt = _Slots(ids, ew, gw, order, A.shape[0])
        parts = _shrink(x, A, A.stride(), A.shape[1], rt, split_k)  # A[e, n=rank, k=in]
        y = _empty(base_out.shape, base_out)
        _expand(parts, B, B.stride(), B.shape[1], y, base_out, scaling, rt, x.shape[1], x.dtype)  # B[e, n=out, k=rank]
        h = _reduce_splits(parts)  # the h the expand used, for dB and dw
        ctx.save_for_backward(x, A, B, ids, ew, gw, order, h)
        ctx.scaling, ctx.split_k = scaling, split_k
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, A, B, ids, ew, gw, order, h = ctx.saved_tensors
        need = ctx.needs_input_grad
        s = ctx.scaling
        rt = _Slots(ids, ew, gw, order, A.shape[0])
        T = x.shape[1]
        dx = dA = dB = dw = dgw = None
        if need[1] or need[2] or need[5] or need[6]:
            # g[j, row] = dy[row] @ B[slot_j]: a shrink with B^T in A's role
            g_parts = _shrink(dy, B, (B.stride(0), B.stride(2), B.stride(1)), B.shape[2], rt, ctx.split_k)
            g = _reduce_splits(g_parts)
        if need[1]:  # dx = sum_j s w_j g_j @ A[slot_j]: an expand with A^T in B's role
            dx = _empty(x.shape, x)
            _expand(g, A, (A.stride(0), A.stride(2), A.stride(1)), A.shape[2], dx, None, s, rt, T, dy.dtype)
        if need[2]:
            dA = _wgrad(g, x, True, _empty(A.shape, A), s, rt, T)
        if need[3]:
            dB = _wgrad(dy, h, False, _empty(B.shape, B), s, rt, T)
        if need[5] or need[6]:  # d weight[b, j] = s * sum_t <g[j, (b, t)], h[j, (b, t)]>
            per_col = (g * h).sum(-1).view(rt.num_cols, x.shape[0], T).sum(-1) * s  # [S, B] in plan order
            if order is not None:
                per_col = torch.empty_like(per_col).index_copy_(1, order.long(), per_col)
            if need[5]:
                dw = per_col[: rt.k].T.to(ew.dtype)
            if need[6]:
                dgw = per_col[rt.k].to(gw.dtype)
        return dy if ctx.needs_input_grad[0] else None, dx, dA, dB, None, dw, dgw, None, None, None


def lora_moe_triton(base_out, x, lora_A, lora_B, expert_ids, expert_weights, global_weight, scaling, *,
                    plan=None, split_k=None):
    """Triton version of lora_moe_ref (same arguments and result).

    plan: optional [B] int32 order of the sequences (`make_plans(...)[r]`); speeds up batches whose
    sequences use different experts, never changes the result. split_k: force the shrink's K split
    (tests and tuning); default: a heuristic from the shapes. When no gradient is needed and base_out
    is contiguous, the delta is added into base_out in place and base_out is returned; otherwise a
    new tensor, differentiable in base_out, x, lora_A, lora_B, expert_weights and global_weight.
    Nothing here synchronises with the device (scaling must be a Python number), and the launch
    grids depend on shapes only, so a decode step can be captured in a CUDA graph.
    """
    if x.dim() != 3 or base_out.dim() != 3:
        raise ValueError("x and base_out must be [B, T, features]")
    if expert_ids.shape[1] == 0 and global_weight is None:
        return base_out
    if plan is not None and tuple(plan.shape) != (x.shape[0],):
        raise ValueError(f"plan must be [B] = [{x.shape[0]}], got {tuple(plan.shape)}")
    plan = plan.contiguous() if plan is not None else None
    if x.shape[0] * x.shape[1] == 0:
        return base_out
    tensors = (base_out, x, lora_A, lora_B, expert_weights, global_weight)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _LoraMoEFunction.apply(base_out, x, lora_A, lora_B, expert_ids, expert_weights, global_weight,
                                      scaling, plan, split_k)
    # inference: no autograd bookkeeping, the epilogue writes into base_out itself
    rt = _Slots(expert_ids, expert_weights, global_weight, plan, lora_A.shape[0])
    h = _shrink(x, lora_A, lora_A.stride(), lora_A.shape[1], rt, split_k)
    y = base_out if base_out.is_contiguous() else _empty(base_out.shape, base_out)
    return _expand(h, lora_B, lora_B.stride(), lora_B.shape[1], y, base_out, scaling, rt, x.shape[1], x.dtype)
