"""Throughput of `awaker serve` with 1, 4 and 16 concurrent clients against the same requests answered
one at a time by the engine (no server), on the loopback only.

The requests are mixed: different prompts, half with an image, so that they route to different
experts. Each client sends its share of the requests one after another (greedy, a fixed max_tokens);
requests/s and output tokens/s are over the wall time of all of them.

    python bench/serve.py                          # the tiny model (built here, random adapters), on the CPU
    python bench/serve.py MODEL --device cuda      # a real awaker model on a GPU (e.g. a 7B upcycle)
    python bench/serve.py --json out.json          # also write the numbers
    python bench/serve.py --clients 16 --burst 16  # and 16 streamed requests released at once (first-token times)

Bounded: --requests (default 32) per setting, --max-tokens (default 32) each, --timeout per request.
Record results with machine and date in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tiny_model(root: Path) -> Path:
    """The tiny Qwen2-VL upcycled with random non-zero adapters, so that routes differ by request."""
    import torch

    from awaker_cli.cli import run
    from awaker_cli.model import adapter_state_dict, load_model, save_model
    from awaker_cli.tiny import build_tiny_base

    base = build_tiny_base(root / "base")
    if run(["upcycle", str(base), str(root / "moe"), "--rank", "8", "--alpha", "16", "--json"]) != 0:
        sys.exit("upcycling the tiny model failed")
    model = load_model(root / "moe")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for key, p in adapter_state_dict(model).items():
            if key.endswith("lora_B") or "gate" in key:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_model(model, root / "model", root / "moe")
    return root / "model"


def requests_of(n: int, max_tokens: int) -> list[tuple[dict, list]]:
    """(API body, engine messages) pairs: different prompts, every other one with a solid-colour image."""
    from PIL import Image

    out = []
    for i in range(n):
        text = f"question {i} : describe what is {'shown' if i % 2 else 'here'} ." + " in detail" * (i % 4)
        api = [{"type": "text", "text": text}]
        eng = [{"type": "text", "text": text}]
        if i % 2:
            image = Image.new("RGB", (84, 56), ((37 * i) % 256, 255 - (23 * i) % 256, (91 * i) % 256))
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            api.insert(0, {"type": "image_url",
                           "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}})
            eng.insert(0, {"type": "image", "image": image})
        body = {"model": "m", "messages": [{"role": "user", "content": api}], "max_tokens": max_tokens,
                "temperature": 0}
        out.append((body, [{"role": "user", "content": eng}]))
    return out


def sequential(model: str, device: str, reqs, max_tokens: int) -> dict:
    """The same requests one at a time on the engine, in this process (the baseline)."""
    from awaker_cli.generate import SamplingParams, load_engine

    engine = load_engine(model, device=device)
    params = SamplingParams(max_new_tokens=max_tokens)
    engine.generate([reqs[0][1]], params)  # warm-up
    t = time.perf_counter()
    tokens = sum(engine.generate([messages], params)[0].new_tokens for _, messages in reqs)
    wall = time.perf_counter() - t
    return {"mode": "engine, one at a time", "clients": 1, "requests": len(reqs), "output_tokens": tokens,
            "wall_s": round(wall, 3), "requests_per_s": round(len(reqs) / wall, 2),
            "output_tokens_per_s": round(tokens / wall, 1)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def through_server(base: str, reqs, clients: int, timeout: float) -> dict:
    import httpx2 as httpx

    with httpx.Client(timeout=timeout) as http:
        def one(body):
            r = http.post(base + "/v1/chat/completions", json=body)
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        metrics0 = scrape(http, base)
        t = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            tokens = sum(pool.map(one, [body for body, _ in reqs]))
        wall = time.perf_counter() - t
        metrics = scrape(http, base)
    steps = metrics["awaker_decode_steps_total"] - metrics0["awaker_decode_steps_total"]
    rows = metrics["awaker_batch_rows_total"] - metrics0["awaker_batch_rows_total"]
    return {"mode": "awaker serve", "clients": clients, "requests": len(reqs), "output_tokens": tokens,
            "wall_s": round(wall, 3), "requests_per_s": round(len(reqs) / wall, 2),
            "output_tokens_per_s": round(tokens / wall, 1),
            "mean_batch_occupancy": round(rows / steps, 2) if steps else 0.0}


def burst(base: str, reqs, timeout: float) -> dict:
    """Every request released at the same moment, streamed: time to the first content chunk (what a
    burst of arrivals waits while the server prefills) and to the end, over all of them."""
    import threading

    import httpx2 as httpx

    gate = threading.Barrier(len(reqs))

    def one(body):
        with httpx.Client(timeout=timeout) as http:
            gate.wait()
            t = time.perf_counter()
            first = None
            with http.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True}) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if first is None and '"content": "' in line and '"content": ""' not in line:
                        first = time.perf_counter() - t
            return first, time.perf_counter() - t

    with httpx.Client(timeout=timeout) as http:
        metrics0 = scrape(http, base)
        with ThreadPoolExecutor(len(reqs)) as pool:
            times = list(pool.map(one, [body for body, _ in reqs]))
        metrics = scrape(http, base)
    ttft = sorted(t for t, _ in times if t is not None)
    prefills = metrics.get("awaker_prefills_total", float("nan")) - metrics0.get("awaker_prefills_total", float("nan"))
    return {"mode": "burst, streamed", "clients": len(reqs), "requests": len(reqs),
            "ttft_median_s": round(ttft[len(ttft) // 2], 3), "ttft_max_s": round(ttft[-1], 3),
            "last_answer_s": round(max(end for _, end in times), 3), "prefills": prefills}


def scrape(http, base: str) -> dict[str, float]:
    text = http.get(base + "/metrics").text
    return {k: float(v) for k, v in (line.split() for line in text.splitlines() if line and line[0] != "#")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="an awaker model directory (default: the tiny model, built here)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-context", type=int, default=512)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request at most")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads of torch, for the baseline and the server alike (tiny kernels on a shared "
                         "machine are fastest on one; 0: torch's default)")
    ap.add_argument("--burst", type=int, default=16, help="requests released at once for the time-to-first-token "
                                                          "row (0: none)")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args(argv)

    env = dict(os.environ)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        env["OMP_NUM_THREADS"] = str(args.threads)  # the server process: torch reads it at start
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(tiny_model(Path(tmp)))
        reqs = requests_of(args.requests, args.max_tokens)
        rows = [sequential(model, args.device, reqs, args.max_tokens)]
        print(json.dumps(rows[-1]), flush=True)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-m", "awaker_cli", "serve", model, "--port", str(port),
                                   "--device", args.device, "--max-batch", str(max(args.clients)),
                                   "--max-context", str(args.max_context), "--max-queue", str(args.requests)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        try:
            import httpx2 as httpx

            deadline = time.time() + 600
            while True:
                try:
                    if httpx.get(base + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    if server.poll() is not None or time.time() > deadline:
                        sys.exit("the server did not start:\n" + server.stderr.read())
                    time.sleep(0.2)
            through_server(base, reqs[:2], 2, args.timeout)  # warm-up
            for clients in args.clients:
                rows.append(through_server(base, reqs, clients, args.timeout))
                print(json.dumps(rows[-1]), flush=True)
            bursts = [burst(base, reqs[:args.burst], args.timeout)] if args.burst else []
            for b in bursts:
                print(json.dumps(b), flush=True)
        finally:
            server.terminate()
            server.wait(30)

    seq = rows[0]["output_tokens_per_s"]
    print(f"\n{'mode':<24}{'clients':>8}{'req/s':>9}{'out tok/s':>11}{'vs seq':>8}{'occupancy':>11}")
    for r in rows:
        print(f"{r['mode']:<24}{r['clients']:>8}{r['requests_per_s']:>9}{r['output_tokens_per_s']:>11}"
              f"{r['output_tokens_per_s'] / seq:>7.2f}x{r.get('mean_batch_occupancy', 1.0):>11}")
    for b in bursts:
        print(f"\n{b['clients']} requests at once: first token after {b['ttft_median_s']} s (median), "
              f"{b['ttft_max_s']} s (last); all answered after {b['last_answer_s']} s; {b['prefills']:g} prefill(s)")
    if args.json:
        meta = {"date": datetime.date.today().isoformat(), "device": args.device, "model": args.model or "tiny",
                "requests": args.requests, "max_tokens": args.max_tokens, "threads": args.threads}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows, "bursts": bursts}, indent=2) + "\n")


if __name__ == "__main__":
    main()
