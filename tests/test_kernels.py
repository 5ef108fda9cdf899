"""Triton kernels against their torch references (lora_moe_ref, routing_ref).

Runs compiled on a CUDA device, on the CPU through Triton's interpreter without one (conftest.py sets
TRITON_INTERPRET before triton is imported; an explicit TRITON_INTERPRET wins; the pytest header says
which mode ran). Shapes are small and odd on purpose (hidden
sizes that are not a multiple of any block, ranks 1..64, 1..8 experts).

Tolerances, as a fraction of the largest magnitude of the exact (float64) result:
  fp32: 1e-5 (forward), float64 gradients: 1e-10;
  bf16: 2e-2, fp16: 5e-3 (a couple of ulps: the 16-bit torch reference is off by as much, see the check).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from awaker_cli import kernels
from awaker_cli.kernels import lora_moe_triton as lmt
from awaker_cli.kernels import routing_triton as rtt
from awaker_cli.kernels.lora_moe_ref import lora_moe_ref
from awaker_cli.kernels.plan import make_plans
from awaker_cli.kernels.routing_ref import routing_ref

from .conftest import INTERPRET

DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 and no CUDA device: compiled kernels cannot run", allow_module_level=True)
if INTERPRET != isinstance(lmt._shrink_kernel, InterpretedFunction):
    raise RuntimeError("triton was imported before TRITON_INTERPRET was settled: set it in the environment")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float64: 1e-10}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Output buffers start as NaN (ids as -7): an element a kernel forgets to write shows up."""

    def empty(shape, like, dtype=None):
        dtype = dtype or like.dtype
        fill = float("nan") if dtype.is_floating_point else -7
        return torch.full(shape, fill, device=like.device, dtype=dtype)

    monkeypatch.setattr(lmt, "_empty", empty)
    monkeypatch.setattr(rtt, "_empty", empty)


def close(got, exact, dtype, what=""):
    scale = exact.abs().max().item() + 1e-30
    err = (got.double() - exact.double()).abs().max().item()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype]:.0e} * {scale:.3g}"
    return err / scale


# ---------------------------------------------------------------------------------------------
# LoRA-MoE
# ---------------------------------------------------------------------------------------------

def make_case(B, T, d_in, d_out, r, E, k, glob, mode, dtype, seed=0):
    """Random inputs; E routed experts (+ the global one in the last slot); weights from probs p."""
    g = torch.Generator().manual_seed(seed)
    slots = E + int(glob)
    x = torch.randn(B, T, d_in, generator=g)
    base = 0.1 * torch.randn(B, T, d_out, generator=g)  # small: the tolerance is relative to the delta
    A = torch.randn(slots, r, d_in, generator=g) / d_in ** 0.5
    Bw = torch.randn(slots, d_out, r, generator=g) / r ** 0.5
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(B)])
    p = torch.softmax(torch.randn(B, E, generator=g), -1).gather(1, ids)  # chosen probabilities
    if mode == "plain":  # a plain LoRA: one slot, id 0, weight 1
        w = torch.ones(B, k)
    else:  # release: p^2 and 1 - p; convex: p and 1 - p (the global weight follows the top choice)
        w = p ** 2 if mode == "release" else p
    gw = (1 - p[:, 0]) if glob else None
    cast = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    return (cast(base), cast(x), cast(A), cast(Bw), ids.to(DEVICE), w.to(DEVICE),
            gw.to(DEVICE) if gw is not None else None)


def exact(base, x, A, Bw, ids, w, gw, s):
    d = lambda t: t.double() if t is not None else None  # noqa: E731
    return lora_moe_ref(d(base), d(x), d(A), d(Bw), ids, d(w), d(gw), s)


CASES = [  # B, T, d_in, d_out, r, E, k, global, mode, dtype, split_k, plan
    pytest.param(6, 1, 40, 72, 8, 4, 1, True, "release", torch.float32, None, True, id="decode-fp32-top1"),
    pytest.param(5, 1, 100, 130, 16, 4, 2, True, "convex", torch.bfloat16, None, True, id="decode-bf16-top2"),
    pytest.param(7, 1, 67, 45, 32, 3, 1, True, "release", torch.float32, 3, False, id="decode-splitk"),
    pytest.param(40, 1, 24, 40, 4, 8, 1, True, "convex", torch.bfloat16, 2, True, id="decode-40seq-8exp"),
    pytest.param(2, 37, 33, 50, 64, 8, 2, False, "convex", torch.float32, None, True, id="prefill-noglobal"),
    pytest.param(3, 20, 48, 24, 1, 1, 1, False, "plain", torch.bfloat16, None, False, id="plain-lora-r1"),
    pytest.param(3, 19, 37, 29, 24, 2, 1, True, "release", torch.bfloat16, None, True, id="prefill-bf16"),
    pytest.param(2, 9, 17, 18, 2, 1, 1, True, "convex", torch.float32, None, False, id="one-expert+global"),
    pytest.param(2, 160, 72, 96, 16, 4, 2, True, "release", torch.bfloat16, None, True, id="prefill-long-bf16"),
    pytest.param(3, 4, 50, 70, 32, 4, 1, True, "release", torch.float16, 2, True, id="fp16"),
]


@pytest.mark.parametrize("B,T,d_in,d_out,r,E,k,glob,mode,dtype,split_k,use_plan", CASES)
def test_lora_moe_forward(B, T, d_in, d_out, r, E, k, glob, mode, dtype, split_k, use_plan):
    base, x, A, Bw, ids, w, gw = make_case(B, T, d_in, d_out, r, E, k, glob, mode, dtype)
    plan = make_plans(ids[:, None], A.shape[0])[0] if use_plan else None
    want = exact(base, x, A, Bw, ids, w, gw, 2.0)
    got = lmt.lora_moe_triton(base.clone(), x, A, Bw, ids, w, gw, 2.0, plan=plan, split_k=split_k)
    assert got.dtype == dtype and got.shape == base.shape
    ours = close(got, want, dtype, "triton")
    if dtype != torch.float32:  # the 16-bit torch reference is no closer to the exact result than we are
        theirs = (lora_moe_ref(base, x, A, Bw, ids, w, gw, 2.0).double() - want).abs().max() / want.abs().max()
        assert ours <= 2 * theirs.item() + 1e-3


def test_lora_moe_non_contiguous_views():
    base, x, A, Bw, ids, w, gw = make_case(4, 6, 30, 20, 8, 4, 1, True, "release", torch.float32)
    xv = x.transpose(0, 1).contiguous().transpose(0, 1)  # batch-first view with odd strides
    bv = torch.stack([base, base], -1)[..., 0]  # non-contiguous base_out
    Av = A.transpose(1, 2).contiguous().transpose(1, 2)
    want = exact(base, x, A, Bw, ids, w, gw, 0.5)
    close(lmt.lora_moe_triton(bv.clone(), xv, Av, Bw, ids, w, gw, 0.5), want, torch.float32)
    close(lmt.lora_moe_triton(bv, xv, Av, Bw, ids, w, gw, 0.5), want, torch.float32)  # not in place


def test_lora_moe_inplace_only_without_grad():
    base, x, A, Bw, ids, w, gw = make_case(3, 2, 16, 16, 4, 2, 1, True, "convex", torch.float32)
    want = exact(base, x, A, Bw, ids, w, gw, 1.0)
    with torch.no_grad():
        b = base.clone()
        out = lmt.lora_moe_triton(b, x, A, Bw, ids, w, gw, 1.0)
        assert out.data_ptr() == b.data_ptr()  # inference adds into base_out
    A.requires_grad_(True)
    b = base.clone()
    out = lmt.lora_moe_triton(b, x, A, Bw, ids, w, gw, 1.0)
    assert out.data_ptr() != b.data_ptr() and torch.equal(b, base)
    close(out.detach(), want, torch.float32)


GRAD_CASES = [  # B, T, d_in, d_out, r, E, k, global, mode, split_k, plan
    pytest.param(5, 1, 23, 19, 8, 4, 1, True, "release", 2, True, id="decode-top1-global"),
    pytest.param(3, 11, 21, 34, 5, 3, 2, True, "convex", None, True, id="prefill-top2-global"),
    pytest.param(4, 7, 18, 17, 16, 4, 2, False, "convex", None, False, id="top2-noglobal"),
    pytest.param(2, 5, 20, 33, 3, 1, 1, False, "plain", None, False, id="plain-lora"),
    pytest.param(2, 150, 24, 40, 8, 3, 1, True, "release", None, True, id="prefill-long"),
]


@pytest.mark.parametrize("B,T,d_in,d_out,r,E,k,glob,mode,split_k,use_plan", GRAD_CASES)
def test_lora_moe_gradients(B, T, d_in, d_out, r, E, k, glob, mode, split_k, use_plan):
    dtype = torch.float64
    base, x, A, Bw, ids, w, gw = make_case(B, T, d_in, d_out, r, E, k, glob, mode, dtype, seed=1)
    w, gw = w.double(), gw.double() if gw is not None else None
    plan = make_plans(ids[:, None], A.shape[0])[0] if use_plan else None
    names = ["base_out", "x", "lora_A", "lora_B", "expert_weights", "global_weight"]
    leaves = [t for t in (base, x, A, Bw, w, gw)]
    ours = [t.clone().requires_grad_() if t is not None else None for t in leaves]
    ref = [t.clone().requires_grad_() if t is not None else None for t in leaves]
    y1 = lmt.lora_moe_triton(ours[0], ours[1], ours[2], ours[3], ids, ours[4], ours[5], 1.5,
                             plan=plan, split_k=split_k)
    y2 = lora_moe_ref(ref[0], ref[1], ref[2], ref[3], ids, ref[4], ref[5], 1.5)
    close(y1.detach(), y2.detach(), dtype, "forward")
    dy = torch.randn_like(y1)
    live = [i for i, t in enumerate(ours) if t is not None]
    g1 = torch.autograd.grad(y1, [ours[i] for i in live], dy)
    g2 = torch.autograd.grad(y2, [ref[i] for i in live], dy)
    for i, a, b in zip(live, g1, g2):
        close(a, b, dtype, "d " + names[i])


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32-master-weights"])
def test_lora_moe_gradients_partial_and_bf16(param_dtype):
    """Stage III (gates frozen): only the experts need gradients; bf16 activations, bf16 parameters or
    fp32 master weights (as under autocast: the products run in bf16, gradients come back in fp32)."""
    base, x, A, Bw, ids, w, gw = make_case(3, 4, 20, 24, 8, 4, 1, True, "release", torch.bfloat16, seed=2)
    A1, B1 = A.to(param_dtype).requires_grad_(), Bw.to(param_dtype).requires_grad_()
    y = lmt.lora_moe_triton(base, x, A1, B1, ids, w, gw, 2.0)
    assert y.dtype == torch.bfloat16
    dy = torch.randn_like(y)
    dA, dB = torch.autograd.grad(y, [A1, B1], dy)
    assert dA.dtype == dB.dtype == param_dtype
    A2, B2 = A.double().requires_grad_(), Bw.double().requires_grad_()
    y2 = lora_moe_ref(base.double(), x.double(), A2, B2, ids, w.double(), gw.double(), 2.0)
    eA, eB = torch.autograd.grad(y2, [A2, B2], dy.double())
    close(dA, eA, torch.bfloat16, "dA")
    close(dB, eB, torch.bfloat16, "dB")


def test_lora_moe_same_expert_twice():
    """ids need not be distinct: a slot chosen twice gets both weights."""
    base, x, A, Bw, ids, w, gw = make_case(4, 3, 20, 24, 8, 3, 2, True, "convex", torch.float32)
    ids = torch.tensor([[1, 1], [0, 2], [2, 2], [0, 1]], device=DEVICE)
    close(lmt.lora_moe_triton(base.clone(), x, A, Bw, ids, w, gw, 1.0), exact(base, x, A, Bw, ids, w, gw, 1.0),
          torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_k_is_deterministic_and_exact(dtype):
    """Small integers everywhere (h is exact in fp32 whatever the order of the adds): every K split
    choice gives the same bits (fp32: the exact result), so each split's partial is summed exactly once
    (the poisoned buffers also show that nothing relies on a zeroed one). Repeated calls with random
    values give the same bits too (the partials are reduced in split order, never atomically)."""
    g = torch.Generator().manual_seed(4)
    B, d_in, d_out, r, E = 5, 300, 40, 16, 4
    ints = lambda *shape: torch.randint(-2, 3, shape, generator=g).to(DEVICE, dtype)  # noqa: E731
    base, x, A, Bw = ints(B, 1, d_out), ints(B, 1, d_in), ints(E + 1, r, d_in), ints(E + 1, d_out, r)
    ids = torch.randint(0, E, (B, 2), generator=g).to(DEVICE)
    w = torch.tensor([0.5, 0.25], device=DEVICE).expand(B, 2).contiguous()
    gw = torch.full((B,), 0.25, device=DEVICE)
    one = lmt.lora_moe_triton(base.clone(), x, A, Bw, ids, w, gw, 0.5, split_k=1)
    if dtype == torch.float32:  # (bf16 rounds the output and, on a GPU, h before the expand's dot)
        assert torch.equal(one.double(), exact(base, x, A, Bw, ids, w, gw, 0.5))
    for split_k in (2, 3, 5):
        got = lmt.lora_moe_triton(base.clone(), x, A, Bw, ids, w, gw, 0.5, split_k=split_k)
        assert torch.equal(got, one), f"split_k={split_k}"
    base, x, A, Bw, ids, w, gw = make_case(6, 1, 300, 40, 16, 4, 2, True, "release", dtype, seed=9)
    first = lmt.lora_moe_triton(base.clone(), x, A, Bw, ids, w, gw, 2.0, split_k=3)
    for _ in range(2):
        assert torch.equal(lmt.lora_moe_triton(base.clone(), x, A, Bw, ids, w, gw, 2.0, split_k=3), first)


def test_make_plans_groups_sequences_by_expert():
    ids = torch.tensor([[[2, 0], [1, 0]], [[0, 1], [1, 2]], [[2, 1], [0, 1]], [[0, 2], [1, 0]]])  # [B=4, R=2, k=2]
    plans = make_plans(ids, 4)
    assert plans.shape == (2, 4) and plans.dtype == torch.int32
    for r in range(2):
        assert sorted(plans[r].tolist()) == [0, 1, 2, 3]
        keys = [tuple(ids[b, r].tolist()) for b in plans[r].tolist()]
        assert keys == sorted(keys)  # sequences with the same experts are adjacent, first expert first


def test_dispatch(monkeypatch):
    base, x, A, Bw, ids, w, gw = make_case(4, 3, 20, 12, 4, 4, 1, True, "release", torch.float32)
    want = lora_moe_ref(base, x, A, Bw, ids, w, gw, 2.0)
    plan = make_plans(ids[:, None], A.shape[0])[0]
    monkeypatch.setenv("AWAKER_KERNELS", "torch")
    assert torch.equal(kernels.lora_moe(base, x, A, Bw, ids, w, gw, 2.0, plan=plan), want)
    monkeypatch.setenv("AWAKER_KERNELS", "triton")
    close(kernels.lora_moe(base.clone(), x, A, Bw, ids, w, gw, 2.0, plan=plan), want, torch.float32)
    span, nw, W, bias = make_router(4, 2, 4, 20, torch.float32)
    ri, rp = kernels.route(span, nw, W, bias, eps=1e-6, temperature=1.0, top_k=1)
    wi, wp = routing_ref(span, nw, W, bias, eps=1e-6, temperature=1.0, top_k=1)
    assert torch.equal(ri, wi) and (rp - wp).abs().max() <= 1e-6


# ---------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------

def make_router(B, R, E, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    span = torch.randn(B, H, generator=g) * 3
    nw = 1 + 0.2 * torch.randn(R, H, generator=g)
    W = 3 * torch.randn(R, E, H, generator=g) / H ** 0.5  # logits of a few units: clear choices
    bias = 0.1 * torch.randn(R, E, generator=g)
    return [t.to(DEVICE, dtype) for t in (span, nw, W, bias)]


@pytest.mark.parametrize("B,R,E,H,k,temp,noise,dtype", [
    pytest.param(3, 5, 4, 100, 1, 1.0, False, torch.float32, id="fp32-top1"),
    pytest.param(9, 3, 6, 77, 2, 0.5, True, torch.float32, id="fp32-top2-noise-E6"),
    pytest.param(4, 4, 8, 130, 2, 0.5, False, torch.bfloat16, id="bf16-top2-E8"),
    pytest.param(2, 2, 1, 33, 1, 1.0, True, torch.bfloat16, id="bf16-one-expert"),
])
def test_routing_forward(B, R, E, H, k, temp, noise, dtype):
    span, nw, W, bias = make_router(B, R, E, H, dtype)
    z = 0.1 * torch.randn(B, R, E, device=DEVICE) if noise else None
    ids, p = rtt.routing_triton(span, nw, W, bias, eps=1e-6, temperature=temp, top_k=k, noise=z)
    rids, rp = routing_ref(span, nw, W, bias, eps=1e-6, temperature=temp, top_k=k, noise=z)
    assert ids.dtype == torch.int64 and p.dtype == torch.float32 and ids.shape == (B, R, k)
    tol = 1e-6 if dtype == torch.float32 else 2e-2  # bf16: one ulp of a bf16 logit moves p by ~1%
    assert (p - rp).abs().max() <= tol
    # the same experts, wherever the choice is not a near-tie (rank k vs k+1 closer than tol)
    full = routing_ref(span, nw, W, bias, eps=1e-6, temperature=temp, top_k=E, noise=z)[1]
    clear = (full[..., k - 1] - full[..., k]) > 2 * tol if k < E else torch.ones_like(full[..., 0], dtype=bool)
    assert clear.float().mean() > 0.5
    assert torch.equal(ids[clear], rids[clear])


def test_routing_gradients():
    span, nw, W, bias = make_router(5, 3, 4, 50, torch.float64, seed=3)
    z = 0.1 * torch.randn(5, 3, 4, dtype=torch.float64)
    ours = [t.clone().requires_grad_() for t in (span, nw, W, bias)]
    ref = [t.clone().requires_grad_() for t in (span, nw, W, bias)]
    i1, p1 = rtt.routing_triton(*ours, eps=1e-6, temperature=0.7, top_k=2, noise=z)
    i2, p2 = routing_ref(*ref, eps=1e-6, temperature=0.7, top_k=2, noise=z)
    assert torch.equal(i1, i2)
    dp = torch.randn_like(p1)
    (p1 * dp).sum().backward()
    (p2 * dp).sum().backward()
    for name, a, b in zip(("span_mean", "norm_weight", "gate_weight", "gate_bias"), ours, ref):
        close(a.grad, b.grad, torch.float64, "d " + name)


def test_routing_gradients_frozen_norm():
    """Only the gate trains (norm weight and span frozen), fp32."""
    span, nw, W, bias = make_router(4, 2, 4, 40, torch.float32, seed=4)
    W1, b1 = W.clone().requires_grad_(), bias.clone().requires_grad_()
    _, p1 = rtt.routing_triton(span, nw, W1, b1, eps=1e-6, temperature=1.0, top_k=1)
    W2, b2 = W.clone().requires_grad_(), bias.clone().requires_grad_()
    _, p2 = routing_ref(span, nw, W2, b2, eps=1e-6, temperature=1.0, top_k=1)
    gW1, gb1 = torch.autograd.grad(p1.sum(), [W1, b1])
    gW2, gb2 = torch.autograd.grad(p2.sum(), [W2, b2])
    close(gW1, gW2, torch.float32, "d gate_weight")
    close(gb1, gb2, torch.float32, "d gate_bias")


# ---------------------------------------------------------------------------------------------
# GPU compilation without a GPU
# ---------------------------------------------------------------------------------------------

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="triton's ptxas is missing")
def test_kernels_compile_for_sm90():
    """The interpreter runs Python, not the compiler: compile the launches for an H100 too (about 30 s
    with a cold Triton cache, a few seconds after)."""
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, str(root / "bench" / "kernels.py"), "--compile-check", "--smoke"],
                         cwd=root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " 0 failed" in run.stdout


# ---------------------------------------------------------------------------------------------
# Fused decode kernels (the generation engine's step)
# ---------------------------------------------------------------------------------------------

from awaker_cli.kernels.lora_glu_ref import lora_glu_ref  # noqa: E402
from awaker_cli.kernels.lora_glu_triton import lora_glu_triton  # noqa: E402
from awaker_cli.kernels.norm_ref import add_rmsnorm_ref  # noqa: E402
from awaker_cli.kernels.norm_triton import add_rmsnorm_triton  # noqa: E402
from awaker_cli.kernels.rope_ref import rope_kv_write_ref  # noqa: E402
from awaker_cli.kernels.rope_triton import rope_kv_write_triton  # noqa: E402


@pytest.mark.parametrize("rows,H,dtype,with_delta", [
    pytest.param(3, 100, torch.float32, True, id="fp32"),
    pytest.param(5, 130, torch.bfloat16, True, id="bf16"),
    pytest.param(2, 64, torch.bfloat16, False, id="bf16-no-residual"),
])
def test_add_rmsnorm(rows, H, dtype, with_delta):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(rows, 1, H, generator=g) * 3).to(DEVICE, dtype)
    d = torch.randn(rows, 1, H, generator=g).to(DEVICE, dtype) if with_delta else None
    w = (1 + 0.3 * torch.randn(H, generator=g)).to(DEVICE, dtype)
    h, y = add_rmsnorm_triton(x, d, w, 1e-6)
    rh, ry = add_rmsnorm_ref(x, d, w, 1e-6)
    assert h.shape == y.shape == x.shape and y.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: one ulp (the interpreter's casts truncate)
    if dtype == torch.float32 or not INTERPRET:  # the residual sum: the same rounding of the same add
        assert torch.equal(h, rh)
    assert (h.double() - rh.double()).abs().max() <= tol * rh.abs().max().double()
    assert (y.double() - ry.double()).abs().max() <= 2 * tol * ry.abs().max().double()  # two roundings


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kv_write(dtype):
    g = torch.Generator().manual_seed(6)
    B, heads, kv_heads, D, L = 3, 4, 2, 16, 7
    qkv = torch.randn(B, 1, (heads + 2 * kv_heads) * D, generator=g).to(DEVICE, dtype)
    angle = torch.rand(B, 1, D // 2, generator=g) * 6
    cos, sin = torch.cat([angle.cos()] * 2, -1).to(DEVICE, dtype), torch.cat([angle.sin()] * 2, -1).to(DEVICE, dtype)
    slot = torch.tensor([4], device=DEVICE)
    caches = [torch.randn(B, kv_heads, L, D, generator=g).to(DEVICE, dtype) for _ in range(2)]
    k1, v1 = (c.clone() for c in caches)
    k2, v2 = (c.clone() for c in caches)
    q1 = rope_kv_write_triton(qkv, cos, sin, k1, v1, slot, heads, kv_heads)
    q2 = rope_kv_write_ref(qkv, cos, sin, k2, v2, slot, heads, kv_heads)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert q1.shape == q2.shape == (B, heads, 1, D)
    assert (q1.double() - q2.double()).abs().max() <= tol * q2.abs().max().double()
    assert (k1.double() - k2.double()).abs().max() <= tol * k2.abs().max().double()
    assert torch.equal(v1, v2)  # values are copied as they are
    others = torch.arange(L) != 4
    assert torch.equal(k1[:, :, others], caches[0][:, :, others]) and torch.equal(v1[:, :, others], caches[1][:, :, others])


@pytest.mark.parametrize("B,T,d_in,inter,r,E,k,glob,dtype,split_k", [
    pytest.param(6, 1, 40, 72, 8, 4, 1, True, torch.float32, None, id="decode-fp32"),
    pytest.param(5, 1, 300, 50, 16, 4, 2, True, torch.bfloat16, 3, id="decode-bf16-splitk"),
    pytest.param(2, 9, 33, 40, 4, 2, 1, False, torch.float32, None, id="prefill-noglobal"),
])
def test_lora_glu(B, T, d_in, inter, r, E, k, glob, dtype, split_k):
    base, x, A, Bw, ids, w, gw = make_case(B, T, d_in, 2 * inter, 2 * r, E, k, glob, "release", dtype, seed=7)
    B_gate = Bw[:, :inter, :r].contiguous()
    B_up = Bw[:, inter:, r:].contiguous()
    plan = make_plans(ids[:, None], A.shape[0])[0]
    got = lora_glu_triton(base, x, A, B_gate, B_up, ids, w, gw, 2.0, plan=plan, split_k=split_k)
    d = lambda t: t.double() if t is not None else None  # noqa: E731
    want = lora_glu_ref(d(base), d(x), d(A), d(B_gate), d(B_up), ids, d(w), d(gw), 2.0)
    assert got.shape == (B, T, inter) and got.dtype == dtype
    close(got, want, dtype, "glu")
