"""Benchmark of the Triton kernels (LoRA-MoE linear, routing) at a family's 7B/8B shapes.

Notes
-----
Run from the repo root:
  python bench/kernels.py [--json [FILE]]   on a GPU (H100): the full table, goals, optional JSON (stdout or FILE)
  python bench/kernels.py --family qwen3_vl   Qwen3-VL-8B's shapes (default qwen2_vl: Qwen2-VL-7B;
                                       qwen2_5_vl: Qwen2.5-VL-7B, the same language-model shapes;
                                       all in bench/shapes.py)
  python bench/kernels.py --quick      decode (1 and 8 sequences) only: a short run per family
  python bench/kernels.py --smoke      on the CPU (TRITON_INTERPRET=1, tiny shapes): checks it runs
  python bench/kernels.py --compile-check [--smoke]
                                       no GPU needed: compiles every kernel launch of the 7B shapes
                                       for sm_90 and prints registers / spills (catches GPU-only
                                       compile errors that the interpreter does not see)

What is measured (triton.testing.do_bench, median, µs):
- LoRA-MoE linears o, gate/up and down (Qwen2-VL-7B: 3584->3584, 3584->18944, 18944->3584; Qwen3-VL-8B:
  4096->4096, 4096->12288, 12288->4096), rank 256, 4 experts + global,
  release weights (p^2 and 1-p), decode (1 token) for 1, 2, 4, 8, 32, 128 sequences and prefill
  1x2048 and 8x512 tokens, with 1, 2 and 4 distinct experts in the batch (sequence b -> expert
  b % n). Columns: ours = the LoRA-MoE part alone (plan from make_plans, delta added in place);
  full = base linear (cuBLAS) + ours; each also under a CUDA graph (`graph`, as the decode engine
  runs it: no Python launch overhead); ref = lora_moe_ref (plain torch matmuls); disp = the
  reference release's dispatcher (peft-fork SparseDispatcher: host index lists, a Python loop over
  the experts; it syncs, so no graph). x = speed-up of ours (eager) over ref / disp.
  BW = essential bytes (weights of the experts in use + base weight for `full`, activations once)
  / graph time, as a fraction of the measured device copy bandwidth; TF = TFLOP/s of `full`.
- routing: all routers (2 per layer: 56 for the 7B models, 72 for Qwen3-VL-8B; E=4) from a 1k-token span,
  span mean included.
- a host-synchronisation check of one decode call (torch.cuda.set_sync_debug_mode("error")).

Goals (printed with PASS/FAIL): 1 sequence base + LoRA-MoE linear >= 85% of copy bandwidth;
8 sequences over 4 experts >= 3x the dispatcher; routing <= 50 µs.

Results: not measured yet; the machine this was written on has no GPU (the kernels were checked in
the interpreter and compiled for sm_90 with --compile-check). Launch heuristics are untuned.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

SMOKE = "--smoke" in sys.argv
COMPILE_CHECK = "--compile-check" in sys.argv
QUICK = "--quick" in sys.argv and not COMPILE_CHECK
# the shapes are module constants (as SMOKE is): read --family before main() parses everything
_pre = argparse.ArgumentParser(add_help=False)
_pre.add_argument("--family", default="qwen2_vl")
FAMILY = _pre.parse_known_args()[0].family
if COMPILE_CHECK:
    os.environ["TRITON_INTERPRET"] = "0"  # real JIT functions, compiled ahead of time below
elif SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from awaker_cli.kernels import lora_glu_triton as lgt  # noqa: E402
from awaker_cli.kernels import lora_moe_triton as lmt  # noqa: E402
from awaker_cli.kernels import norm_triton as nt  # noqa: E402
from awaker_cli.kernels import rope_triton as rpt  # noqa: E402
from awaker_cli.kernels import routing_triton as rtt  # noqa: E402
from awaker_cli.kernels.lora_moe_ref import lora_moe_ref  # noqa: E402
from awaker_cli.kernels.plan import make_plans  # noqa: E402
from awaker_cli.kernels.routing_ref import routing_ref  # noqa: E402
from bench.shapes import SHAPES  # noqa: E402

if FAMILY not in SHAPES:
    sys.exit(f"--family must be one of {', '.join(SHAPES)}, got {FAMILY!r}")
SHAPE = SHAPES[FAMILY]
if SMOKE:  # the family's widths / 64 (Qwen2-VL's 56 and 296 are no multiple of a block: masks run too)
    LINEARS = {k: (a // 64, b // 64) for k, (a, b) in SHAPE.linears.items()}
    RANK, DECODE, PREFILL = 8, (1, 3), ((1, 16), (2, 8))
    ROUTERS, HIDDEN, SPAN = 3, SHAPE.hidden // 64, 16
    HEADS = (4, 2, 16)  # attention heads, KV heads, head size of the decode-step kernels
else:
    LINEARS = SHAPE.linears
    RANK, DECODE, PREFILL = 256, (1, 2, 4, 8, 32, 128), ((1, 2048), (8, 512))
    ROUTERS, HIDDEN, SPAN = SHAPE.routers, SHAPE.hidden, 1024
    HEADS = (SHAPE.heads, SHAPE.kv_heads, SHAPE.head_dim)
if QUICK:
    DECODE, PREFILL = DECODE if SMOKE else (1, 8), ()
EXPERTS, SCALING, DTYPE = 4, 2.0, torch.bfloat16
DEVICE = "cpu" if SMOKE or COMPILE_CHECK else "cuda"


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------

def bench(fn, graph=False):
    """Median µs."""
    if DEVICE == "cpu":  # smoke: the interpreter, a rough wall clock
        fn()
        t = time.perf_counter()
        for _ in range(2):
            fn()
        return (time.perf_counter() - t) / 2 * 1e6
    if graph:
        return triton.testing.do_bench_cudagraph(fn, return_mode="median") * 1e3
    return triton.testing.do_bench(fn, return_mode="median") * 1e3


def copy_bandwidth():
    """Bytes/s of a device copy (read + write), the yardstick for bandwidth-bound kernels."""
    n = (1 << 20) if SMOKE else (1 << 30)
    a = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    b = torch.empty_like(a)
    return 2 * n / (bench(lambda: b.copy_(a)) * 1e-6)


# --------------------------------------------------------------------------------------------
# the reference release's dispatcher (peft-fork LoraLinear + SparseDispatcher), stacked weights
# --------------------------------------------------------------------------------------------

def dispatcher_style(base_out, x, A, B, gates, scaling):
    E = gates.shape[1]
    nz = torch.nonzero(gates)
    sorted_experts, index_sorted = nz.sort(0)
    _, expert_index = sorted_experts.split(1, dim=1)
    batch_index = nz[index_sorted[:, 1], 0]
    part_sizes = (gates > 0).sum(0).tolist()  # host sync, every layer, every step
    inp = x[batch_index].split(part_sizes, dim=0)
    outs = [F.linear(F.linear(inp[e], A[e]), B[e]) * scaling for e in range(E)]
    stitched = torch.cat(outs, 0)
    gnz = gates[batch_index.flatten(), expert_index.flatten()]
    stitched = stitched * gnz[:, None, None].to(stitched.dtype)
    ye = torch.zeros_like(base_out).index_add(0, batch_index, stitched)
    yg = F.linear(F.linear(x, A[E]), B[E]) * scaling
    w = gates.max(dim=1)[0][:, None, None].to(base_out.dtype)
    return base_out + ye * w + yg * (1 - w)


# --------------------------------------------------------------------------------------------
# LoRA-MoE
# --------------------------------------------------------------------------------------------

def make_inputs(d_in, d_out, nseq, T, distinct, device=DEVICE, dtype=DTYPE):
    g = torch.Generator().manual_seed(0)
    def mk(*shape, scale=1.0):
        if device == "meta":  # --compile-check: shapes only
            return torch.empty(*shape, device="meta", dtype=dtype)
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    W = mk(d_out, d_in, scale=d_in ** -0.5)
    A = mk(EXPERTS + 1, RANK, d_in, scale=d_in ** -0.5)
    B = mk(EXPERTS + 1, d_out, RANK, scale=RANK ** -0.5)
    x = mk(nseq, T, d_in)
    ids = (torch.arange(nseq) % distinct)[:, None].to(device)
    p = (0.3 + 0.6 * torch.rand(nseq, 1, generator=g)).to(device)
    w, gw = p ** 2, 1 - p[:, 0]  # release weights
    gates = torch.zeros(nseq, EXPERTS, device=device).scatter(1, ids, p)
    plan = make_plans(ids[:, None, :], EXPERTS + 1)[0]
    return dict(W=W, A=A, B=B, x=x, ids=ids, w=w, gw=gw, gates=gates, plan=plan)


def bench_linear(name, d_in, d_out, nseq, T, distinct, copy_bps):
    t = make_inputs(d_in, d_out, nseq, T, distinct)
    W, A, B, x, ids, w, gw, plan = (t[k] for k in ("W", "A", "B", "x", "ids", "w", "gw", "plan"))
    base = F.linear(x, W)
    acc = base.clone()

    def ours():
        lmt.lora_moe_triton(acc, x, A, B, ids, w, gw, SCALING, plan=plan)

    def full():
        lmt.lora_moe_triton(F.linear(x, W), x, A, B, ids, w, gw, SCALING, plan=plan)

    # correctness first (fresh base: `acc` keeps accumulating while timed)
    got = lmt.lora_moe_triton(base.clone(), x, A, B, ids, w, gw, SCALING, plan=plan).float()
    want = lora_moe_ref(base.float(), x.float(), A.float(), B.float(), ids, w, gw, SCALING)
    rel_err = ((got - want).abs().max() / (want - base.float()).abs().max()).item()

    r = dict(linear=name, seqs=nseq, tokens=T, experts=distinct, rel_err=round(rel_err, 5))
    with torch.no_grad():
        r["ours_us"] = bench(ours)
        r["graph_us"] = bench(ours, graph=True) if DEVICE == "cuda" else r["ours_us"]
        r["full_us"] = bench(full)
        r["full_graph_us"] = bench(full, graph=True) if DEVICE == "cuda" else r["full_us"]
        r["base_us"] = bench(lambda: F.linear(x, W))
        r["ref_us"] = bench(lambda: lora_moe_ref(base, x, A, B, ids, w, gw, SCALING))
        r["disp_us"] = bench(lambda: dispatcher_style(base, x, A, B, t["gates"], SCALING))
    el = x.element_size()
    used = distinct + 1  # routed experts in use + the global one
    lora_bytes = used * RANK * (d_in + d_out) * el + x.numel() * el + 2 * base.numel() * el
    full_bytes = W.numel() * el + used * RANK * (d_in + d_out) * el + x.numel() * el + base.numel() * el
    rows = nseq * T
    r["ours_bw"] = lora_bytes / (r["graph_us"] * 1e-6) / copy_bps
    r["full_bw"] = full_bytes / (r["full_graph_us"] * 1e-6) / copy_bps
    r["full_tflops"] = 2 * rows * (d_in * d_out + 2 * RANK * (d_in + d_out)) / (r["full_graph_us"] * 1e-6) / 1e12
    r["x_ref"] = r["ref_us"] / r["ours_us"]
    r["x_disp"] = r["disp_us"] / r["ours_us"]
    return r


def bench_routing(nseq):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(nseq, SPAN + 64, HIDDEN, generator=g).to(DEVICE, DTYPE)
    nw = torch.ones(ROUTERS, HIDDEN, device=DEVICE, dtype=DTYPE)
    gw = (torch.randn(ROUTERS, EXPERTS, HIDDEN, generator=g) * HIDDEN ** -0.5).to(DEVICE, DTYPE)
    gb = torch.zeros(ROUTERS, EXPERTS, device=DEVICE, dtype=DTYPE)
    start = 32

    def run(fn):
        span_mean = emb[:, start:start + SPAN].mean(1)
        return fn(span_mean, nw, gw, gb, eps=1e-6, temperature=1.0, top_k=1)

    with torch.no_grad():
        ok = torch.equal(run(rtt.routing_triton)[0], run(routing_ref)[0])
        return dict(seqs=nseq, routers=ROUTERS, span=SPAN, same_ids=ok,
                    ours_us=bench(lambda: run(rtt.routing_triton)),
                    ref_us=bench(lambda: run(routing_ref)))


def check_no_sync():
    """One decode call of lora_moe under the sync debugger: any host synchronisation raises."""
    d_in, d_out = LINEARS["o"]
    t = make_inputs(d_in, d_out, 8, 1, 4)
    base = F.linear(t["x"], t["W"])
    args = (base, t["x"], t["A"], t["B"], t["ids"], t["w"], t["gw"], SCALING)
    lmt.lora_moe_triton(*args, plan=t["plan"])  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        lmt.lora_moe_triton(*args, plan=t["plan"])
        return True
    except RuntimeError as e:
        print("host sync inside lora_moe:", e)
        return False
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------------------------
# ahead-of-time compile check (no GPU needed)
# --------------------------------------------------------------------------------------------

def compile_check(arch=90):
    """Compile every launch the launchers make at the benchmark's shapes (meta tensors, nothing
    runs), mimicking the JIT's specialisation (ints equal to 1 are constants, multiples of 16 and
    pointers are marked divisible by 16); print registers and spills from cuobjdump."""
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    types = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
             torch.int32: "i32"}
    seen, failures = {}, []

    class Catch:  # stands in for a kernel: records the launch and compiles it
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *a, **kw: self.compile(grid, *a, **kw)

        def compile(self, grid, *args, num_warps=4, num_stages=3, **kw):
            vals = dict(zip(self.fn.arg_names, args), **kw)
            sig, const, attrs = {}, {}, {}
            for i, p in enumerate(self.fn.params):
                v = vals[p.name]
                if p.is_constexpr or (isinstance(v, int) and not isinstance(v, bool) and v == 1):
                    sig[p.name], const[p.name] = "constexpr", v
                elif isinstance(v, torch.Tensor):
                    sig[p.name], attrs[(i,)] = "*" + types[v.dtype], [["tt.divisibility", 16]]
                elif isinstance(v, float):
                    sig[p.name] = "fp32"
                else:
                    sig[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
                    if v % 16 == 0:
                        attrs[(i,)] = [["tt.divisibility", 16]]
            key = (self.fn.__name__, str(sorted(sig.items())), str(sorted(const.items(), key=str)), str(attrs),
                   num_warps)
            if key in seen:
                return
            label = f"{self.fn.__name__} grid={grid} " + " ".join(
                f"{k}={v}" for k, v in const.items() if k.isupper() and "DTYPE" not in k)
            try:
                k = triton.compile(ASTSource(self.fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                                   options=dict(num_warps=num_warps, num_stages=num_stages))
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(k.asm["cubin"])
                    f.flush()
                    res = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", f.name],
                                         capture_output=True, text=True).stdout
                usage = " ".join(w for w in next((ln for ln in res.splitlines() if "REG:" in ln), "").split()
                                 if w.startswith(("REG:", "STACK:", "LOCAL:")))
                seen[key] = usage
                print(f"ok   {label} warps={num_warps} {usage} shared={k.metadata.shared}", flush=True)
            except Exception as e:  # noqa: BLE001 - report every failing variant, then fail
                seen[key] = "FAIL"
                failures.append(label)
                print(f"FAIL {label}: {type(e).__name__}: {str(e)[:2000]}", flush=True)

    for mod, name in ((lmt, "_shrink_kernel"), (lmt, "_expand_kernel"), (lmt, "_wgrad_kernel"),
                      (rtt, "_routing_kernel"), (nt, "_add_rmsnorm_kernel"), (rpt, "_rope_kv_kernel"),
                      (lgt, "_glu_expand_kernel")):
        setattr(mod, name, Catch(getattr(mod, name)))
    lmt._num_sms = lambda device: 132  # H100 heuristics, not the CPU's

    for dtype in (torch.bfloat16, torch.float32) if not SMOKE else (torch.bfloat16,):
        for (d_in, d_out) in list(LINEARS.values())[: 1 if SMOKE else None]:
            cases = [(DECODE[0], 1), PREFILL[0]] if SMOKE else [(n, 1) for n in DECODE] + list(PREFILL)
            for nseq, T in cases:
                for k, glob in ((1, True), (2, False)) if nseq == DECODE[0] else ((1, True),):
                    t = make_inputs(d_in, d_out, nseq, T, 1, device="meta", dtype=dtype)
                    ids = torch.zeros(nseq, k, dtype=torch.int64, device="meta")
                    w = torch.zeros(nseq, k, device="meta", requires_grad=True)
                    gw = t["gw"].float().requires_grad_() if glob else None
                    x = t["x"].requires_grad_()
                    A, B = t["A"].requires_grad_(), t["B"].requires_grad_()
                    base = torch.zeros(nseq, T, d_out, device="meta", dtype=dtype)
                    for plan in (t["plan"], None) if nseq == DECODE[0] else (t["plan"],):
                        with torch.no_grad():
                            lmt.lora_moe_triton(base, x, A, B, ids, w, gw, SCALING, plan=plan)
                        if T > 1 or nseq == DECODE[0]:  # training shapes: backward too
                            lmt.lora_moe_triton(base, x, A, B, ids, w, gw, SCALING, plan=plan).sum().backward()
        for k, noise in ((1, False), (2, True)):
            m = lambda *s: torch.zeros(*s, device="meta", dtype=dtype)  # noqa: E731
            z = torch.zeros(8, ROUTERS, EXPERTS, device="meta") if noise else None
            for nseq in (1, 8):
                rtt.routing_triton(m(nseq, HIDDEN), m(ROUTERS, HIDDEN), m(ROUTERS, EXPERTS, HIDDEN),
                                   m(ROUTERS, EXPERTS), eps=1e-6, temperature=1.0, top_k=k,
                                   noise=z[:nseq] if z is not None else None)
        compile_decode_step_kernels(dtype)
    spills = [k for k, v in seen.items() if "STACK:0" not in v and v != "FAIL"]
    print(f"{len(seen)} variants compiled for sm_{arch}: {len(failures)} failed, {len(spills)} with a stack (spills)")
    return not failures


def compile_decode_step_kernels(dtype):
    """The engine's fused decode kernels (residual + RMSNorm, rope + KV write, gate/up SiLU-gate) at the
    benchmark's decode batch sizes; called inside compile_check with the kernels replaced by Catch."""
    m = lambda *s, dt=dtype: torch.zeros(*s, device="meta", dtype=dt)  # noqa: E731
    d_in, inter = LINEARS["o"][0], LINEARS["down"][0]
    heads, kv_heads, dim = HEADS
    for nseq in (DECODE[0], DECODE[-1]):
        for delta in (m(nseq, 1, HIDDEN), None):
            nt.add_rmsnorm_triton(m(nseq, 1, HIDDEN), delta, m(HIDDEN), 1e-6)
        caches = [m(nseq, kv_heads, 64, dim) for _ in range(2)]
        rpt.rope_kv_write_triton(m(nseq, 1, (heads + 2 * kv_heads) * dim), m(nseq, 1, dim), m(nseq, 1, dim),
                                 *caches, torch.zeros(1, dtype=torch.int64, device="meta"), heads, kv_heads)
        for k, glob in ((1, True), (2, False)):
            ids = torch.zeros(nseq, k, dtype=torch.int64, device="meta")
            gw = m(nseq, dt=torch.float32) if glob else None
            plan = torch.zeros(nseq, dtype=torch.int32, device="meta")  # make_plans output: [B] int32
            lgt.lora_glu_triton(m(nseq, 1, 2 * inter), m(nseq, 1, d_in), m(EXPERTS + 1, 2 * RANK, d_in),
                                m(EXPERTS + 1, inter, RANK), m(EXPERTS + 1, inter, RANK), ids,
                                m(nseq, k, dt=torch.float32), gw, SCALING, plan=plan)


# --------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                    help="print all results as one JSON object at the end (or write it to FILE)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU through the interpreter")
    ap.add_argument("--compile-check", action="store_true", help="compile for sm_90 only, no GPU needed")
    ap.add_argument("--family", choices=list(SHAPES), default="qwen2_vl",
                    help="whose 7B/8B shapes (Qwen2.5-VL's language model has Qwen2-VL's)")
    ap.add_argument("--quick", action="store_true", help="decode only, 1 and 8 sequences (no prefill)")
    args = ap.parse_args()
    if args.compile_check:
        sys.exit(0 if compile_check() else 1)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no GPU: use --smoke (CPU interpreter) or --compile-check")

    out = dict(family=FAMILY, shapes=SHAPE.label, device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (interpreter)")
    copy_bps = copy_bandwidth()
    out["copy_TBps"] = copy_bps / 1e12
    print(f"{out['device']}: copy bandwidth {copy_bps / 1e12:.2f} TB/s")
    if DEVICE == "cuda":
        out["no_host_sync"] = check_no_sync()
        print(f"no host sync in a decode call: {out['no_host_sync']}")

    print(f"\n{SHAPE.label}{' (tiny)' if SMOKE else ''}: LoRA-MoE linear, rank {RANK}, {EXPERTS} experts + global, {DTYPE}; times in µs")
    head = (f"{'linear':8} {'seqs':>4} {'tok':>5} {'exp':>3} | {'ours':>8} {'graph':>8} {'BW':>5} | {'full':>8} "
            f"{'graph':>8} {'BW':>5} {'TF':>6} | {'ref':>8} {'x':>5} | {'disp':>8} {'x':>5} | err")
    print(head)
    rows = []
    for name, (d_in, d_out) in LINEARS.items():
        for nseq, T in [(n, 1) for n in DECODE] + list(PREFILL):
            for distinct in (1, 2, 4):
                if distinct > nseq:
                    continue
                r = bench_linear(name, d_in, d_out, nseq, T, distinct, copy_bps)
                rows.append(r)
                print(f"{name:8} {nseq:4} {T:5} {distinct:3} | {r['ours_us']:8.1f} {r['graph_us']:8.1f} "
                      f"{r['ours_bw']:5.0%} | {r['full_us']:8.1f} {r['full_graph_us']:8.1f} {r['full_bw']:5.0%} "
                      f"{r['full_tflops']:6.1f} | "
                      f"{r['ref_us']:8.1f} {r['x_ref']:5.1f} | {r['disp_us']:8.1f} {r['x_disp']:5.1f} | "
                      f"{r['rel_err']:.1e}", flush=True)
    out["lora_moe"] = rows

    print(f"\nrouting: {ROUTERS} routers, {EXPERTS} experts, hidden {HIDDEN}, span {SPAN} (span mean included)")
    out["routing"] = [bench_routing(n) for n in (1, 8)]
    for r in out["routing"]:
        print(f"  {r['seqs']} seq: ours {r['ours_us']:.1f} µs, torch {r['ref_us']:.1f} µs, same ids: {r['same_ids']}")

    goals = []
    for r in rows:
        if r["seqs"] == 1 and r["tokens"] == 1:
            goals.append((f"1 seq base + LoRA-MoE {r['linear']} >= 85% copy BW", r["full_bw"] >= 0.85,
                          f"{r['full_bw']:.0%}"))
    for r in rows:
        if r["seqs"] == 8 and r["tokens"] == 1 and r["experts"] == 4:
            goals.append((f"8 seq / 4 experts {r['linear']} >= 3x dispatcher", r["x_disp"] >= 3,
                          f"{r['x_disp']:.1f}x"))
    goals.append(("routing (1 seq) <= 50 us", out["routing"][0]["ours_us"] <= 50,
                  f"{out['routing'][0]['ours_us']:.1f} us"))
    print("\ngoals" + (" (smoke run: meaningless)" if SMOKE else ""))
    for what, ok, val in goals:
        print(f"  {'PASS' if ok else 'FAIL'}  {what}: {val}")
    out["goals"] = [dict(goal=w, ok=ok, value=v) for w, ok, v in goals]
    bad = [r for r in rows if r["rel_err"] > 3e-2]
    if bad:
        print(f"\nWARNING: {len(bad)} configurations differ from the reference by > 3%")
    if args.json == "-":
        print(json.dumps(out, default=float))
    elif args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(out, default=float, indent=1) + "\n")


if __name__ == "__main__":
    main()
