"""Stage-II training step of a Qwen2-VL-7B-shaped model (random bf16 weights, nothing to download).

The model `awaker train --recipe stage2` trains: frozen bf16 base; q/k/v with a rank-256 LoRA; o/gate/
up/down with 4 routed experts + the global expert (rank 256, alpha 512, top-1, convex combine); routers
train; adapters and their Adam states in fp32; bf16 autocast; gradient checkpointing. Each timed step is
one optimizer step as the training loop takes it: `--grad-accum` micro-batches of forward (routing once
per sequence), cross-entropy on the answer tokens and backward, then clipping and AdamW (timed apart).
Samples are text-only, `--seq` tokens each, the first `--prompt` of them the routing span (unlabelled).

Reported: tokens/s, seconds a step (forward+backward and update apart), peak GPU memory (allocated and
reserved), and tokens/s as a fraction of the compute-bound ceiling of issue 5 (35.4 GFLOP a token:
about 27k tokens/s on an H100 at 989 dense bf16 TFLOP/s). 35.4 GFLOP is forward and input-gradient
backward of the 7.07 G base matmul weights (4 × 7.07) plus forward and backward of the 1.18 G adapter
weights a token uses (6 × 1.18); the recompute of gradient checkpointing (2 × (6.53 + 1.18) GFLOP in
the layers) is not in it, so with checkpointing about 35.4 / 50.8 = 0.70 is the most this step reaches.

    python bench/train.py                  # one H100 (the whole 7B stage-2 state must fit: ~65 GB)
    python bench/train.py --layers 14      # half the layers, if it does not
    python bench/train.py --smoke          # the tiny model on the CPU: checks that the harness runs
    python bench/train.py --cpu --layers 1 --seq 128 --prompt 32 --grad-accum 1 --steps 2   # 7B widths, CPU
    python bench/train.py --json out.json  # also write the numbers

Record results with device, date and command in bench/RESULTS.md.
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

from awaker_cli.model import AwakerConfig, attach_adapters  # noqa: E402
from awaker_cli.tiny import build_processor, tiny_config  # noqa: E402
from awaker_cli.train.loop import IGNORE_INDEX, balance_loss, prepare_for_training, token_loss_sum  # noqa: E402
from awaker_cli.train.parallel import make_optimizer  # noqa: E402
from awaker_cli.train.recipe import DEFAULT_MOE_TARGETS, TrainSection  # noqa: E402
from awaker_cli.train.stages import StagePlan, describe_trainable, set_trainable, trainable_parameters  # noqa: E402
from bench.shapes import build_model, qwen2vl_7b_config  # noqa: E402

GFLOP_PER_TOKEN = 35.4  # issue 5's figure for this step of the 7B model
H100_CEILING = 27_000  # tokens/s, issue 5: compute-bound at 35.4 GFLOP a token


def stage2_config(model, tokenizer, rank: int) -> AwakerConfig:
    """What plan_stage builds for stage 2 from a stage-1 model of this rank (the recipe's settings)."""
    moe = list(DEFAULT_MOE_TARGETS)
    return AwakerConfig(
        num_experts=4, rank=rank, alpha=2.0 * rank, dropout=0.05, top_k=1, global_expert=True, combine="convex",
        lora_targets=["q_proj", "k_proj", "v_proj"], moe_targets=moe, router_noise_std=0.1,
        num_layers=model.config.get_text_config().num_hidden_layers,
        span_token_ids={n: tokenizer.convert_tokens_to_ids(f"<|{n}|>") for n in ("im_start", "im_end", "vision_start")},
    ).with_moe_targets_only_owners().validate()


@torch.no_grad()
def start_like_stage2(model):
    """Stage II starts from a trained stage-I LoRA: make every LoRA B non-zero so that the expert
    kernels' backward does the full work (a zero B would still cost the same FLOPs, but be honest)."""
    g = torch.Generator(device=model.device).manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            p.copy_(torch.randn(p.shape, generator=g, device=p.device) * 1e-3)


def make_batch(batch: int, seq: int, prompt: int, vocab: int, device) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000 if vocab > 2000 else 10, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "spans": torch.tensor([[0, prompt]] * batch)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks that the harness runs")
    ap.add_argument("--cpu", action="store_true", help="the 7B shapes on the CPU (slow; use with --layers 1 "
                                                       "--seq 128 --prompt 32: checks the real shapes, measures "
                                                       "nothing)")
    ap.add_argument("--seq", type=int, help="tokens a sample (default 2048; smoke 64)")
    ap.add_argument("--prompt", type=int, help="routing-span tokens at the start of each sample (default 256)")
    ap.add_argument("--batch", type=int, default=1, help="samples a micro-batch")
    ap.add_argument("--grad-accum", type=int, help="micro-batches an optimizer step (default 16, the stage-2 "
                                                   "recipe's; smoke 2)")
    ap.add_argument("--rank", type=int, help="LoRA rank (default 256; smoke 8)")
    ap.add_argument("--layers", type=int, help="decoder layers (default: the model's, 28)")
    ap.add_argument("--steps", type=int, help="timed optimizer steps (default 3; smoke 1)")
    ap.add_argument("--warmup", type=int, help="untimed optimizer steps first (default 1)")
    ap.add_argument("--no-checkpointing", action="store_true", help="keep all activations (more memory)")
    ap.add_argument("--balance", type=float, default=0.0, help="balance-loss coefficient")
    ap.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    args = ap.parse_args(argv)

    smoke = args.smoke
    device = torch.device("cpu" if smoke or args.cpu else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/train.py needs a CUDA GPU (or --smoke for the CPU check)")
    seq, prompt = args.seq or (64 if smoke else 2048), args.prompt or (16 if smoke else 256)
    rank, steps, warmup = args.rank or (8 if smoke else 256), args.steps or (1 if smoke else 3), args.warmup or 1
    accum = args.grad_accum or (2 if smoke else 16)
    if not 0 < prompt < seq:
        sys.exit(f"--prompt must be between 1 and --seq - 1 (got {prompt} of {seq}): the rest are the trained tokens")
    precision = "fp32" if smoke else "bf16"

    processor = build_processor()
    config = tiny_config(processor.tokenizer) if smoke else qwen2vl_7b_config(processor.tokenizer)
    if args.layers:
        config.text_config.num_hidden_layers = args.layers
    t0 = time.perf_counter()
    model = build_model(config, device, torch.float32 if smoke else torch.bfloat16)
    cfg = stage2_config(model, processor.tokenizer, rank)
    attach_adapters(model, cfg, adapter_dtype=torch.float32)
    start_like_stage2(model)
    set_trainable(model, StagePlan(2, Path("."), cfg, None))
    prepare_for_training(model, gradient_checkpointing=not args.no_checkpointing)
    params = [p for _, p in trainable_parameters(model)]
    optimizer = make_optimizer(params, TrainSection(), device, sharded=False)  # the loop's (fused on a GPU)
    counts = describe_trainable(model)
    print(f"built the {'tiny' if smoke else '7B-shaped'} stage-2 model in {time.perf_counter() - t0:.1f} s: "
          f"{counts['total']:,} trainable parameters", flush=True)

    vocab = config.get_text_config().vocab_size
    n_labels = accum * args.batch * (seq - prompt)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> tuple[float, float, float]:
        """One optimizer step as the loop takes it: (loss, seconds of forward+backward, seconds of the
        clipping and AdamW update)."""
        t = time.perf_counter()
        total = 0.0
        for _ in range(accum):
            batch = make_batch(args.batch, seq, prompt, vocab, device)
            loss = token_loss_sum(model, model, batch, device, precision) / n_labels
            if args.balance:
                loss = loss + args.balance * balance_loss(model.awaker_state.current, cfg.num_experts) / accum
            loss.backward()
            total += float(loss.detach())
        sync()
        t_update = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return total, t_update - t, time.perf_counter() - t_update

    for _ in range(warmup):
        first_loss = step()[0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timed = [step() for _ in range(steps)]
    last_loss = timed[-1][0]
    middle = sorted(timed, key=lambda r: r[1] + r[2])[len(timed) // 2]  # the median optimizer step
    step_s = middle[1] + middle[2]
    tokens_per_s = accum * args.batch * seq / step_s
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "date": datetime.date.today().isoformat(),
        "command": "python bench/train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "layers": config.get_text_config().num_hidden_layers, "rank": rank, "seq": seq, "batch": args.batch,
        "grad_accum": accum, "gradient_checkpointing": not args.no_checkpointing,
        "trainable_parameters": counts["total"],
        "step_s": round(step_s, 4), "forward_backward_s": round(middle[1], 4), "update_s": round(middle[2], 4),
        "tokens_per_s": round(tokens_per_s, 1),
        "loss_first_last": [round(first_loss, 4), round(last_loss, 4)],
    }
    if device.type == "cuda":
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        paper_shape = result["layers"] == 28 and rank == 256 and seq == 2048
        if paper_shape and "H100" in result["device"]:  # the ceiling is for this model on this GPU
            result["fraction_of_ceiling"] = round(tokens_per_s / H100_CEILING, 3)
            result["model_tflops"] = round(tokens_per_s * GFLOP_PER_TOKEN / 1000, 1)
            if not args.no_checkpointing:  # see the module docstring: at most about 0.70 then
                result["fraction_note"] = "the recompute of gradient checkpointing is not in 35.4 GFLOP/token"
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
