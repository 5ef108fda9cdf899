"""One prepared GPU run that measures everything (issue 15), inside a single 9-minute device call.

    python bench/gpu_check.py --out $OUT        # on the GPU machine, from the repository root
    python bench/gpu_check.py --smoke           # the same harness on the CPU, tiny shapes (a few seconds)

Stages, most important first; each writes its results into OUT/gpu_check.json as soon as it ends, and
a stage that would not fit in what is left of --budget-s is skipped (and says so):
  1. kernel_tests: tests/test_kernels.py and the kernel budget, compiled (TRITON_INTERPRET=0);
  2. decode: a Qwen2-VL-7B-shaped random bf16 model, side by side in this process: transformers dense
     eager `generate`, peft LoRA r256 unmerged, a release-style dispatcher (bench/anchors.py), the
     engine dense and awaker (r256, 4 experts + global) at batch 1 and 8 (mixed experts), each as
     decode tokens/s and a fraction of the bandwidth roofline; the engine's CUDA-graph decode compared
     token for token with its eager decode;
  3. kernels: bench/kernels.py (each kernel as a fraction of measured copy bandwidth);
  4. train: one stage-2 optimizer step of bench/train.py (tokens/s, peak memory);
  5. nf4: bench/decode.py --quantize nf4 (needs bitsandbytes: wheels in .whl/ are installed first);
  6. families: a short run per other family at its real shapes (bench/shapes.py), each its own process:
     bench/decode.py --family qwen2_5_vl / qwen3_vl (awaker only, batch 1 and 8 mixed, 64 new tokens)
     and bench/kernels.py --family qwen3_vl --quick (Qwen2.5-VL's language model has Qwen2-VL's shapes,
     already timed in stage 3). Last, so it only uses time the stages above leave.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# run as `python bench/gpu_check.py`, bench/ would be first on the path and bench/kernels.py would pass
# for the `kernels` package transformers probes for
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))


class Report:
    def __init__(self, out_dir: Path | None, budget_s: float):
        self.path = out_dir / "gpu_check.json" if out_dir else None
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.data: dict = {"date": datetime.date.today().isoformat(), "stages": {}}

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def stage(self, name: str, need_s: float, fn):
        if self.left() < need_s:
            self.data["stages"][name] = {"skipped": f"needs ~{need_s:.0f} s, {self.left():.0f} s left"}
        else:
            t = time.perf_counter()
            try:
                result = fn()
            except Exception as e:  # a failed stage must not lose the others' figures
                import traceback

                result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            result["wall_s"] = round(time.perf_counter() - t, 1)
            self.data["stages"][name] = result
        print(f"[{name}] {json.dumps(self.data['stages'][name])[:600]}", flush=True)
        self.save()

    def save(self):
        if self.path:
            self.path.write_text(json.dumps(self.data, indent=1) + "\n")


def run(cmd, timeout, env=None) -> dict:
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})})
        return {"cmd": " ".join(map(str, cmd)), "rc": p.returncode, "stdout_tail": p.stdout[-4000:],
                "stderr_tail": p.stderr[-2000:]}
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"cmd": " ".join(map(str, cmd)), "rc": None, "timed_out_s": timeout, "stdout_tail": out[-4000:]}


def install_wheels() -> dict:
    """pip-install the wheels carried in .whl/ (bitsandbytes, pytest) when their module is missing."""
    import importlib.util

    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    missing = [m for m in ("bitsandbytes", "pytest") if importlib.util.find_spec(m) is None]
    if not wheels or not missing:
        return {"installed": [], "missing": missing}
    r = run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *map(str, wheels)], 180)
    return {"installed": [w.name for w in wheels], "missing_before": missing, "rc": r["rc"],
            "stderr_tail": r.get("stderr_tail", "")[-800:]}


def kernel_tests() -> dict:
    r = run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests/test_kernels.py",
             "tests/test_kernel_budget.py"], 300, env={"TRITON_INTERPRET": "0"})
    lines = r["stdout_tail"].strip().splitlines()
    r["summary"] = lines[-1] if lines else ""
    r["mode"] = next((line for line in r["stdout_tail"].splitlines() if line.startswith("triton kernels:")), None)
    return r


def decode(smoke: bool, new_tokens: int) -> dict:
    import torch

    from awaker_cli.generate import Engine, SamplingParams
    from awaker_cli.tiny import build_processor, tiny_config

    from bench.anchors import measure_anchors
    from bench.decode import add_adapters, copy_bandwidth, measure, mixed_routing, prompt_of, step_bytes
    from bench.shapes import build_model, qwen2vl_7b_config

    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    rank, experts, batches = (8 if smoke else 256), 4, (1, 2) if smoke else (1, 8)
    processor = build_processor()
    tok = processor.tokenizer
    config = tiny_config(tok) if smoke else qwen2vl_7b_config(tok)
    t = time.perf_counter()
    model = build_model(config, device, dtype)
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "build_s": round(time.perf_counter() - t, 1), "new_tokens": new_tokens, "rank": rank, "experts": experts}
    bandwidth = copy_bandwidth(device)
    out["copy_TBps"] = round(bandwidth / 1e12, 3) if bandwidth == bandwidth else None
    request = prompt_of(tok, processor, 48 if smoke else 256)
    text = processor.apply_chat_template(request, add_generation_prompt=True, tokenize=False)
    ids = tok(text, return_tensors="pt")["input_ids"].to(device)
    out["anchors"] = measure_anchors(model, {b: ids.repeat(b, 1) for b in batches}, new_tokens, rank, experts)

    rows = []

    def engine_rows(engine, label, routed):
        for batch in batches:
            pinned = mixed_routing(model.awaker_config, batch, engine.device) if routed and batch > 1 else None
            r = measure(engine, [request] * batch, new_tokens, pinned, repeats=1 if smoke else 2)
            used = 1 if batch == 1 else experts
            roof = bandwidth / step_bytes(model, engine, batch, used if routed else 0) * batch
            r.update(model=label, batch=batch, mixed=bool(pinned is not None),
                     fraction_of_roofline=round(r["tokens_per_s"] / roof, 3) if roof == roof else None)
            rows.append(r)

    graphs = None if device == "cuda" else False
    dense = Engine(model, processor, use_graphs=graphs)
    engine_rows(dense, "engine-dense", False)
    del dense
    add_adapters(model, processor, rank, experts)
    engine = Engine(model, processor, use_graphs=graphs)
    engine_rows(engine, "engine-awaker", True)
    out["engine"] = rows
    out["graphs_off"] = engine.graphs_off

    # CUDA-graph decode against eager decode of the same engine, token for token (mixed experts)
    batch = batches[-1]
    state = model.awaker_state
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    state.fixed = mixed_routing(model.awaker_config, batch, engine.device)
    try:
        with_graphs = engine.use_graphs
        a = [g.tokens for g in engine.generate([request] * batch, params)]
        engine._buffers.clear()
        engine._prefix = None
        engine.use_graphs = False
        b = [g.tokens for g in engine.generate([request] * batch, params)]
        engine.use_graphs = with_graphs
    finally:
        state.fixed = None
    out["graph_vs_eager"] = {"graphs_used": with_graphs, "batch": batch, "equal": a == b,
                             "first_difference": next(([i, j] for i, (x, y) in enumerate(zip(a, b))
                                                       for j, (p, q) in enumerate(zip(x, y)) if p != q), None)}
    if device == "cuda":
        out["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the harness")
    ap.add_argument("--out", type=Path, default=None, help="folder for gpu_check.json (default $OUT if set)")
    ap.add_argument("--budget-s", type=float, default=500.0, help="wall-clock budget for all stages")
    ap.add_argument("--new-tokens", type=int, default=None)
    args = ap.parse_args(argv)
    out_dir = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            sys.exit("bench/gpu_check.py needs a CUDA GPU (or --smoke for the CPU check)")
    else:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    report = Report(out_dir, args.budget_s)
    report.data["smoke"] = args.smoke
    new_tokens = args.new_tokens or (3 if args.smoke else 64)
    if args.smoke:  # the subprocess stages (tests, bench scripts) have their own CPU checks in the suite
        for name in ("kernel_tests", "kernels", "train", "nf4", "families"):
            report.data["stages"][name] = {"skipped": "smoke"}
        report.stage("decode", 0, lambda: decode(True, new_tokens))
        return report.data
    report.data["wheels"] = install_wheels()
    report.stage("kernel_tests", 120, kernel_tests)
    report.stage("decode", 150, lambda: decode(False, new_tokens))
    kjson = out_dir / "kernels.json" if out_dir else Path("/tmp/kernels.json")

    def kernels():  # the JSON goes to a file: stdout_tail keeps only the table's end
        return {**run([sys.executable, "-m", "bench.kernels", "--json", str(kjson)], min(150, report.left() - 60)),
                "json": str(kjson)}

    report.stage("kernels", 90, kernels)
    train_json = str(out_dir / "train.json") if out_dir else "/tmp/train.json"
    report.stage("train", 100, lambda: {**run([sys.executable, "-m", "bench.train", "--steps", "1", "--warmup", "1",
                                               "--json", train_json], min(200, report.left() - 10)),
                                        "json": train_json})
    nf4_json = str(out_dir / "decode-nf4.json") if out_dir else "/tmp/decode-nf4.json"

    def nf4():
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            return {"skipped": "bitsandbytes is not installed (carry its wheel in .whl/)"}
        return {**run([sys.executable, "-m", "bench.decode", "--quantize", "nf4", "--no-dense", "--batches", "1",
                       "--new-tokens", "64", "--repeats", "1", "--json", nf4_json], min(200, report.left() - 5)),
                "json": nf4_json}

    report.stage("nf4", 60, nf4)

    def families():
        out = {}
        for family in ("qwen2_5_vl", "qwen3_vl"):
            if report.left() < 50:
                out[f"decode-{family}"] = {"skipped": f"{report.left():.0f} s left"}
                continue
            path = str(out_dir / f"decode-{family}.json") if out_dir else f"/tmp/decode-{family}.json"
            out[f"decode-{family}"] = {**run([sys.executable, "-m", "bench.decode", "--family", family, "--no-dense",
                                              "--batches", "1,8", "--new-tokens", "64", "--repeats", "1",
                                              "--json", path], min(120, report.left() - 5)), "json": path}
        if report.left() >= 40:
            path = str(out_dir / "kernels-qwen3_vl.json") if out_dir else "/tmp/kernels-qwen3_vl.json"
            out["kernels-qwen3_vl"] = {**run([sys.executable, "-m", "bench.kernels", "--family", "qwen3_vl", "--quick",
                                              "--json", path], min(90, report.left() - 5)), "json": path}
        else:
            out["kernels-qwen3_vl"] = {"skipped": f"{report.left():.0f} s left"}
        return out

    report.stage("families", 50, families)
    report.data["total_s"] = round(time.perf_counter() - report.t0, 1)
    report.save()
    return report.data


if __name__ == "__main__":
    main()
