"""Triton routing: every router of the model in one launch; the specification is routing_ref.py.

One program = one router x a block of sequences: RMSNorm of the span means (two passes over H, the
sum of squares in fp32), the gate linear with the router's weights read once for the whole block,
softmax(logits / temperature) in fp32 and an iterative top-k, all in registers. The intermediate
roundings of the reference (normed cast to the input dtype, the product with the norm weight, the
gate output and bias in the parameter dtype) are reproduced, so bf16 routing picks the same experts.

Stage II trains the gates through the probabilities: `routing_triton` wraps the kernel in an
autograd Function whose backward recomputes the reference math (a [B, R, E, H] problem, cheap) and
differentiates the probabilities of the experts the kernel chose.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .routing_ref import routing_ref

_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
       torch.float64: tl.float64}


@triton.jit
def _routing_kernel(
    x_ptr, nw_ptr, w_ptr, bias_ptr, noise_ptr, ids_ptr, probs_ptr,
    B, H, E, eps, temperature,
    sxb, sxh, snr, snh, swr, swe, swh, sbr, sbe, szb, szr, sze, sib, sir, sik, spb, spr, spk,
    TOP_K: tl.constexpr, HAS_NOISE: tl.constexpr,
    NORM_DTYPE: tl.constexpr, PROD_DTYPE: tl.constexpr, GATE_DTYPE: tl.constexpr, LOGIT_DTYPE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
):
    r = tl.program_id(0)
    b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = b < B
    e = tl.arange(0, BLOCK_E)
    e_ok = e < E

    # RMSNorm statistics in fp32
    ss = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        xv = tl.load(x_ptr + b[:, None] * sxb + h[None, :] * sxh, mask=b_ok[:, None] & (h < H)[None, :],
                     other=0.0).to(tl.float32)
        ss += tl.sum(xv * xv, axis=1)
    rstd = 1.0 / tl.sqrt_rn(ss / H + eps)

    # gate logits: the router's [E, H] weights are loaded once for the whole block of sequences
    acc = tl.zeros((BLOCK_B, BLOCK_E), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        h_ok = h < H
        xv = tl.load(x_ptr + b[:, None] * sxb + h[None, :] * sxh, mask=b_ok[:, None] & h_ok[None, :],
                     other=0.0).to(tl.float32)
        xn = (xv * rstd[:, None]).to(NORM_DTYPE).to(tl.float32)
        nw = tl.load(nw_ptr + r * snr + h * snh, mask=h_ok, other=0.0).to(tl.float32)
        xn = (xn * nw[None, :]).to(PROD_DTYPE).to(tl.float32)
        w = tl.load(w_ptr + r * swr + e[:, None] * swe + h[None, :] * swh, mask=e_ok[:, None] & h_ok[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(xn[:, None, :] * w[None, :, :], axis=2)
    bias = tl.load(bias_ptr + r * sbr + e * sbe, mask=e_ok, other=0.0).to(tl.float32)
    logits = (acc.to(GATE_DTYPE).to(tl.float32) + bias[None, :]).to(LOGIT_DTYPE).to(tl.float32)
    if HAS_NOISE:
        logits += tl.load(noise_ptr + b[:, None] * szb + r * szr + e[None, :] * sze,
                          mask=b_ok[:, None] & e_ok[None, :], other=0.0).to(tl.float32)

    # softmax with temperature, fp32
    logits = tl.where(e_ok[None, :], tl.div_rn(logits, temperature), float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    p = tl.where(e_ok[None, :], p, -1.0)  # padding experts are never chosen

    # top-k by repeated arg-max (k is tiny); ties go to the lower expert index
    for j in tl.static_range(TOP_K):
        best = tl.max(p, axis=1)
        idx = tl.min(tl.where(p == best[:, None], e[None, :], BLOCK_E), axis=1)
        tl.store(ids_ptr + b * sib + r * sir + j * sik, idx.to(tl.int64), mask=b_ok)
        tl.store(probs_ptr + b * spb + r * spr + j * spk, best, mask=b_ok)
        p = tl.where(e[None, :] == idx[:, None], -2.0, p)


def _empty(shape, like: torch.Tensor, dtype) -> torch.Tensor:
    """Every output buffer comes from here (tests poison it to catch unwritten elements)."""
    return torch.empty(shape, device=like.device, dtype=dtype)


def _route_kernel(span_mean, norm_weight, gate_weight, gate_bias, eps, temperature, top_k, noise):
    Bsz, H = span_mean.shape
    R, E, _ = gate_weight.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, {E}], got {top_k}")
    ids = _empty((Bsz, R, top_k), span_mean, torch.int64)
    probs = _empty((Bsz, R, top_k), span_mean, torch.float32)
    if Bsz == 0 or R == 0:
        return ids, probs
    # the dtypes the reference rounds to along the way (torch type promotion)
    prod = torch.promote_types(span_mean.dtype, norm_weight.dtype)
    gate = torch.promote_types(prod, gate_weight.dtype)
    logit = torch.promote_types(gate, gate_bias.dtype)
    BLOCK_E = triton.next_power_of_2(E)
    BLOCK_B = min(8, triton.next_power_of_2(Bsz))
    BLOCK_H = max(32, min(512, 4096 // (BLOCK_B * BLOCK_E)))  # the [b, e, h] product stays in registers
    z = noise if noise is not None else probs
    zs = (z.stride(0), z.stride(1), z.stride(2))
    grid = (R, triton.cdiv(Bsz, BLOCK_B))
    _routing_kernel[grid](
        span_mean, norm_weight, gate_weight, gate_bias, z, ids, probs,
        Bsz, H, E, float(eps), float(temperature),
        span_mean.stride(0), span_mean.stride(1), norm_weight.stride(0), norm_weight.stride(1),
        gate_weight.stride(0), gate_weight.stride(1), gate_weight.stride(2), gate_bias.stride(0), gate_bias.stride(1),
        *zs, *ids.stride(), *probs.stride(),
        TOP_K=top_k, HAS_NOISE=noise is not None,
        NORM_DTYPE=_TL[span_mean.dtype], PROD_DTYPE=_TL[prod], GATE_DTYPE=_TL[gate], LOGIT_DTYPE=_TL[logit],
        BLOCK_B=BLOCK_B, BLOCK_E=BLOCK_E, BLOCK_H=BLOCK_H, num_warps=4)
    return ids, probs


class _RoutingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, span_mean, norm_weight, gate_weight, gate_bias, noise, eps, temperature, top_k):
        ids, probs = _route_kernel(span_mean, norm_weight, gate_weight, gate_bias, eps, temperature, top_k, noise)
        ctx.save_for_backward(span_mean, norm_weight, gate_weight, gate_bias, noise, ids)
        ctx.eps, ctx.temperature = eps, temperature
        ctx.mark_non_differentiable(ids)
        return ids, probs

    @staticmethod
    @once_differentiable
    def backward(ctx, _dids, dprobs):
        *inputs, ids = ctx.saved_tensors
        E = inputs[2].shape[1]
        leaves = [t.detach().requires_grad_(need) if t is not None else None
                  for t, need in zip(inputs, ctx.needs_input_grad)]
        with torch.enable_grad():
            # the reference with k = E returns every probability (sorted); put them back in expert order
            # and take the ones the kernel chose, so a near-tie cannot switch experts here
            all_ids, all_p = routing_ref(*leaves[:4], eps=ctx.eps, temperature=ctx.temperature, top_k=E,
                                         noise=leaves[4])
            chosen = torch.zeros_like(all_p).scatter(-1, all_ids, all_p).gather(-1, ids)
            wanted = [t for t in leaves if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(chosen, wanted, dprobs, allow_unused=True))
        out = [next(grads) if t is not None and t.requires_grad else None for t in leaves]
        return (*out, None, None, None)


def routing_triton(span_mean, norm_weight, gate_weight, gate_bias, *, eps, temperature, top_k, noise=None):
    """Triton version of routing_ref (same arguments and result, probabilities differentiable)."""
    tensors = (span_mean, norm_weight, gate_weight, gate_bias, noise)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _RoutingFunction.apply(span_mean, norm_weight, gate_weight, gate_bias, noise, eps, temperature, top_k)
    return _route_kernel(span_mean, norm_weight, gate_weight, gate_bias, eps, temperature, top_k, noise)
