"""The decode anchors of docs/design.md section 6, measured by this project's own harness: transformers'
eager `generate` on the dense model, peft LoRA (rank r on all 7 linears, unmerged) and a release-style
LoRA-MoE (a dispatcher loop over the experts with the gate evaluated every step, as the public release's
code does). Used by bench/gpu_check.py, in the same process as the engine's figures.

Decode tokens/s = batch * (N - 1) / (time of an N-token generate - time of a 1-token generate), so the
prefill is left out as the engine's figure leaves it out.
"""
from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MOE_TARGETS = ("o_proj", "gate_proj", "up_proj", "down_proj")


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def hf_decode_tps(model, input_ids, new_tokens: int) -> float:
    """Decode tokens/s of transformers' greedy `generate` (eager, its default dynamic cache)."""
    mask = torch.ones_like(input_ids)

    def run(n):
        _sync(input_ids.device)
        t = time.perf_counter()
        model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
        _sync(input_ids.device)
        return time.perf_counter() - t

    run(2)  # warm-up
    first, full = run(1), run(new_tokens)
    if full <= first:  # noise larger than the decode time (tiny smoke shapes)
        return None
    return input_ids.shape[0] * (new_tokens - 1) / (full - first)


class ReleaseMoELinear(nn.Module):
    """A LoRA-MoE linear as the release computes it: the gate on the mean input of every forward, top-1,
    then a Python loop over the experts gathering the rows routed to each (host syncs every step), the
    global expert on all rows; release combine (p^2 routed, 1 - p global)."""

    def __init__(self, base: nn.Linear, rank: int, experts: int):
        super().__init__()
        self.base = base
        w = base.weight
        self.gate = nn.Linear(base.in_features, experts, device=w.device, dtype=w.dtype)
        self.A = nn.Parameter(torch.randn(experts + 1, rank, base.in_features, device=w.device, dtype=w.dtype) * 0.02)
        self.B = nn.Parameter(torch.randn(experts + 1, base.out_features, rank, device=w.device, dtype=w.dtype) * 0.02)
        self.scaling = 2.0

    def forward(self, x):
        y = self.base(x)
        p = self.gate(x.mean(1)).float().softmax(-1)
        top_p, top_i = p.max(-1)
        for e in range(self.A.shape[0] - 1):
            rows = (top_i == e).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            delta = (x[rows] @ self.A[e].T) @ self.B[e].T
            y.index_add_(0, rows, delta * (self.scaling * top_p[rows] ** 2).to(y.dtype)[:, None, None])
        glob = (x @ self.A[-1].T) @ self.B[-1].T
        return y + glob * (self.scaling * (1 - top_p)).to(y.dtype)[:, None, None]


class _LoRA(nn.Module):
    """A plain unmerged LoRA (the release's q/k/v)."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        w = base.weight
        self.A = nn.Parameter(torch.randn(rank, base.in_features, device=w.device, dtype=w.dtype) * 0.02)
        self.B = nn.Parameter(torch.randn(base.out_features, rank, device=w.device, dtype=w.dtype) * 0.02)

    def forward(self, x):
        return self.base(x) + 2.0 * ((x @ self.A.T) @ self.B.T)


@contextlib.contextmanager
def release_style(model, rank: int, experts: int):
    """The model's decoder linears swapped for release-style modules while inside; restored after."""
    swapped = []
    for layer in model.model.language_model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in LINEARS:
                base = getattr(parent, name, None)
                if isinstance(base, nn.Linear):
                    new = ReleaseMoELinear(base, rank, experts) if name in MOE_TARGETS else _LoRA(base, rank)
                    setattr(parent, name, new)
                    swapped.append((parent, name, base))
    try:
        yield model
    finally:
        for parent, name, base in swapped:
            setattr(parent, name, base)


@contextlib.contextmanager
def peft_lora(model, rank: int):
    """peft LoRA of rank `rank` on the language model's 7 linears, unmerged, while inside."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, init_lora_weights=False,
                     target_modules=r".*language_model.*\.(" + "|".join(LINEARS) + ")")
    wrapped = get_peft_model(model, cfg)
    try:
        yield wrapped
    finally:
        wrapped.unload()


def measure_anchors(model, input_ids_by_batch: dict, new_tokens: int, rank: int, experts: int,
                    skip: tuple = ()) -> list[dict]:
    """[{"model", "batch", "tokens_per_s"}] for the dense eager, peft and release-style anchors."""
    rows = []

    def record(label, m):
        for batch, ids in input_ids_by_batch.items():
            tps = hf_decode_tps(m, ids, new_tokens)
            rows.append({"model": label, "batch": batch, "tokens_per_s": None if tps is None else round(tps, 2)})

    record("transformers-dense-eager", model)
    if "peft" not in skip:
        try:
            with peft_lora(model, rank) as wrapped:
                record(f"peft-lora-r{rank}-unmerged", wrapped)
        except ImportError as e:
            rows.append({"model": f"peft-lora-r{rank}-unmerged", "skipped": f"peft not importable ({e})"})
    with release_style(model, rank, experts) as m:
        record("release-style-dispatcher", m)
    return rows
