"""Decode throughput of the generation engine (awaker_cli/generate) on a GPU.

A 7B/8B-shaped model of one family (--family: Qwen2-VL-7B, Qwen2.5-VL-7B or Qwen3-VL-8B, shapes in
bench/shapes.py) with random bf16 weights (nothing to download), first dense, then with
awaker adapters attached (rank 256, 4 experts + global, release combine):
  - batch 1 after a ~256-token prompt, and the same with a 448x448 image (512x512 for Qwen3-VL's 16-pixel patches: +256 image tokens),
  - batch 8 and 32 with mixed experts (every sequence and router pinned to a different expert),
each reported as decode tokens/s (all sequences), time to first token, and the fraction of the
batch-1 roofline (bytes one decode step must read / measured copy bandwidth).

    python bench/decode.py                 # the GPU benchmark (about 2 minutes on an H100)
    python bench/decode.py --family qwen3_vl   # Qwen3-VL-8B's shapes (default qwen2_vl)
    python bench/decode.py --smoke         # the same harness on the family's tiny model, on the CPU (a check)
    python bench/decode.py --json out.json # also write the numbers

Record results with device and date in bench/RESULTS.md (the H100 anchors: docs/design.md section 6).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from awaker_cli.generate import Engine, SamplingParams  # noqa: E402
from awaker_cli.model import AwakerConfig, Routing, adapter_state_dict, attach_adapters  # noqa: E402
from awaker_cli.model.families import family_of_model  # noqa: E402
from awaker_cli.tiny import build_processor, tiny_config  # noqa: E402

from bench.shapes import SHAPES, build_model, quantize_decoder_linears, real_config  # noqa: E402

IMAGE_SIDE = 448


@torch.no_grad()
def add_adapters(model, processor, rank, experts):
    tok = processor.tokenizer
    cfg = AwakerConfig(num_experts=experts, rank=rank, alpha=2.0 * rank, dropout=0.0,
                       family=family_of_model(model).name,
                       num_layers=model.config.get_text_config().num_hidden_layers,
                       span_token_ids={n: tok.convert_tokens_to_ids(f"<|{n}|>")
                                       for n in ("im_start", "im_end", "vision_start")})
    attach_adapters(model, cfg)
    g = torch.Generator(device=model.device).manual_seed(0)
    for key, p in adapter_state_dict(model).items():  # non-zero everywhere: the kernels do real work
        scale = 1.0 if "norm_weight" in key else 0.02
        p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32) * scale)
    return cfg


def prompt_of(tokenizer, processor, target: int, image=None):
    """A chat request whose text part makes the templated prompt about `target` tokens long."""
    words = ("the image shows three green triangles and a red circle on the left , "
             "describe the colours and count the shapes . ").split()

    def request(n):
        text = " ".join(words[i % len(words)] for i in range(n))
        content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": text}]
        return [{"role": "user", "content": content}]

    def length(n):
        msgs = [{"role": "user", "content": [{"type": "text", "text": request(n)[0]["content"][-1]["text"]}]}]
        return len(tokenizer(processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))["input_ids"])

    lo, hi = 1, target
    while lo < hi:  # fewest words reaching the target length
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if length(mid) < target else (lo, mid)
    return request(lo)


def copy_bandwidth(device) -> float:
    """Device copy bandwidth in bytes/s (read + write), as docs/design.md's anchor measures it."""
    if device == "cpu":
        return float("nan")
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - t)


def step_bytes(model, engine, batch: int, experts_used: int) -> int:
    """Bytes one decode step must read: every language-model weight but the embedding table, the
    adapters of the experts in use (+ global), and the KV cache of a ~512-token context."""
    lm = model.model.language_model
    skip = {id(lm.embed_tokens.weight)}
    total = 0
    for name, p in model.named_parameters():
        if "visual" in name or id(p) in skip or "lora_" in name or "awaker_routers" in name:
            continue
        total += p.numel() * p.element_size()
    if hasattr(model, "awaker_config"):
        cfg = model.awaker_config
        for name, p in model.named_parameters():
            if "lora_" in name and p.dim() == 3:  # MoE stacks [S, ...]: the used slots only
                total += p[0].numel() * p.element_size() * (experts_used + (1 if cfg.global_expert else 0))
    total += 2 * len(engine.layers) * batch * 512 * engine.num_kv_heads * engine.head_dim * 2
    return total


def measure(engine, requests, new_tokens, pinned=None, repeats=2):
    """Best decode tokens/s of `repeats` timed runs (after one warm-up run that captures the graph)."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    state = getattr(engine.model, "awaker_state", None)
    if state is not None:
        state.fixed = pinned
    try:
        engine.generate(requests, params)  # warm-up: kernels compiled, graph captured for this shape
        best = None
        for _ in range(repeats):
            gens = engine.generate(requests, params)
            g = gens[0]
            rate = len(requests) * (g.new_tokens - 1) / max(g.decode_s, 1e-9)
            if best is None or rate > best["tokens_per_s"]:
                best = {"tokens_per_s": round(rate, 1), "time_to_first_token_s": round(g.time_to_first_token_s, 4),
                        "prompt_tokens": g.prompt_tokens, "new_tokens": g.new_tokens}
        return best
    finally:
        if state is not None:
            state.fixed = None


def mixed_routing(cfg, batch, device) -> Routing:
    """Every sequence and router on a different expert (b + r mod E), p = 0.6."""
    b = torch.arange(batch, device=device)[:, None]
    r = torch.arange(cfg.num_routers, device=device)[None, :]
    ids = ((b + r) % cfg.num_experts)[..., None]
    probs = torch.full(ids.shape, 0.6, device=device)
    return Routing.from_probs(ids, probs, cfg.combine, cfg.global_expert)


def run_suite(engine, model, processor, args, image, label, bandwidth) -> list[dict]:
    tok = processor.tokenizer
    rows = []
    cases = [("b1", 1, None)]
    if image is not None:
        cases.append(("b1+image", 1, image))
    cases += [(f"b{b}-mixed", b, None) for b in args.batches if b > 1]
    for name, batch, img in cases:
        req = prompt_of(tok, processor, args.prompt_tokens, img)
        pinned = None
        if hasattr(model, "awaker_config") and batch > 1:
            pinned = mixed_routing(model.awaker_config, batch, engine.device)
        result = measure(engine, [req] * batch, args.new_tokens, pinned, repeats=args.repeats)
        experts_used = 1 if batch == 1 else (model.awaker_config.num_experts if hasattr(model, "awaker_config") else 0)
        roof = bandwidth / step_bytes(model, engine, batch, experts_used) * batch
        result.update(model=label, case=name, batch=batch,
                      roofline_tokens_per_s=round(roof, 1) if roof == roof else None,
                      fraction_of_roofline=round(result["tokens_per_s"] / roof, 3) if roof == roof else None)
        rows.append(result)
        print(f"{label:6} {name:10} {result['tokens_per_s']:9.1f} tok/s   first token {result['time_to_first_token_s']:.3f} s"
              f"   prompt {result['prompt_tokens']}   roofline {result['roofline_tokens_per_s']}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=list(SHAPES), default="qwen2_vl",
                    help="the model family whose 7B/8B shapes (or, with --smoke, tiny model) to run")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks that the harness runs")
    ap.add_argument("--prompt-tokens", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    ap.add_argument("--quantize", choices=["none", "nf4", "int8"], default="none",
                    help="the decoder's linears in bitsandbytes nf4/int8, as an `awaker export` loads (needs "
                         "bitsandbytes)")
    ap.add_argument("--no-graphs", action="store_true", help="decode eagerly (no CUDA graph), for comparison")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step before capturing it")
    ap.add_argument("--json", dest="json_out", default=None, help="write the results to this file")
    args = ap.parse_args(argv)

    smoke = args.smoke
    device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        sys.exit("bench/decode.py needs a CUDA GPU (or --smoke for the CPU check)")
    args.prompt_tokens = args.prompt_tokens or (48 if smoke else 256)
    args.new_tokens = args.new_tokens or (8 if smoke else 256)
    args.batches = args.batches or ([1, 3] if smoke else [1, 8, 32])
    args.repeats = args.repeats or (1 if smoke else 2)
    rank = args.rank or (8 if smoke else 256)
    dtype = torch.float32 if smoke else torch.bfloat16

    processor = build_processor(min_pixels=56 * 56, max_pixels=(112 if smoke else IMAGE_SIDE) ** 2,
                                family=args.family)
    from PIL import Image

    # the same 256 image tokens (16 x 16 merged patches) for 14- and 16-pixel patches (Qwen3-VL)
    side = (56 if smoke else IMAGE_SIDE) * processor.image_processor.patch_size // 14
    image = Image.new("RGB", (side, side), (180, 40, 40))
    config = (tiny_config(processor.tokenizer, family=args.family) if smoke
              else real_config(args.family, processor.tokenizer))
    t = time.perf_counter()
    model = build_model(config, device, dtype)
    if args.quantize != "none":
        quantize_decoder_linears(model, args.quantize, dtype)
    print(f"built {'tiny ' + args.family if smoke else SHAPES[args.family].label + '-shaped'} model{'' if args.quantize == 'none' else ' (' + args.quantize + ')'} "
          f"in {time.perf_counter() - t:.1f} s on {device}", flush=True)
    bandwidth = copy_bandwidth(device)
    graphs = False if (args.no_graphs or smoke) else None
    rows = []
    if not args.no_dense:
        engine = Engine(model, processor, use_graphs=graphs, compile=args.compile)
        rows += run_suite(engine, model, processor, args, image, "dense", bandwidth)
        del engine
        if device == "cuda":
            torch.cuda.empty_cache()
    add_adapters(model, processor, rank, args.experts)
    engine = Engine(model, processor, use_graphs=graphs, compile=args.compile)
    rows += run_suite(engine, model, processor, args, image, "awaker", bandwidth)

    dense = {r["case"]: r["tokens_per_s"] for r in rows if r["model"] == "dense"}
    for r in rows:
        if r["model"] == "awaker" and r["case"] in dense:
            r["vs_dense"] = round(r["tokens_per_s"] / dense[r["case"]], 3)
    info = {"family": args.family, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "copy_TBps": round(bandwidth / 1e12, 3) if bandwidth == bandwidth else None,
            "quantize": args.quantize, "rank": rank, "experts": args.experts, "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens, "graphs": not (args.no_graphs or smoke), "compile": args.compile,
            "peak_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None,
            "results": rows}
    print(json.dumps(info, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(info, indent=1) + "\n")
    return info


if __name__ == "__main__":
    main()
