"""Choosing the next token from logits: greedy, or temperature with optional top-k / top-p, seeded.

Everything stays on the device and nothing waits for it: the draw uses the exponential race
(argmax of p / E with E ~ Exp(1) picks token i with probability p_i) instead of torch.multinomial,
so sampling never synchronises the host with the GPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import AwakerError


@dataclass
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None: a random seed (reported in the result)
    ignore_eos: bool = False  # keep going past a stop token (benchmarks, tests)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def validate(self) -> "SamplingParams":
        if self.max_new_tokens < 1:
            raise AwakerError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise AwakerError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise AwakerError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise AwakerError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        return self


def draw_seed(params: SamplingParams) -> int | None:
    """The seed a request samples with: its own, else a random one drawn here so that it can be reported
    and replayed; None for greedy decoding without a seed."""
    if params.seed is None and not params.greedy:
        return int.from_bytes(os.urandom(4), "little")
    return params.seed


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next tokens [B] (int64)."""
    if params.greedy:
        return logits.argmax(-1)
    logits = logits.float() / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        ordered, index = logits.sort(-1, descending=True)
        probs = ordered.softmax(-1)
        # keep the smallest prefix whose mass reaches top_p (the most likely token always stays)
        drop = probs.cumsum(-1) - probs >= params.top_p
        logits = torch.full_like(logits, float("-inf")).scatter(-1, index, ordered.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(-1)
