"""Instance-level routing: one vector per sequence (the mean input embedding over its prompt span),
all routers evaluated on it once, and the result reused by every later forward of that sequence."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import AwakerError
from .config import SPAN_RULES


@dataclass(frozen=True)
class SpanTokens:
    """Token ids the span rule looks for; read from the model's config and tokenizer, never hard-coded."""

    vision_start: int
    im_start: int
    im_end: int


def _nth(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Per row, the index of the n-th True of a [B, T] mask, or -1 where there are fewer."""
    hit = mask & (mask.cumsum(1) == n)
    return torch.where(hit.any(1), hit.int().argmax(1), -1)


def routing_spans(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, tokens: SpanTokens,
                  rule: str = "prompt") -> torch.Tensor:
    """[B, 2] half-open spans [start, end) per docs/design.md section 1.

    prompt:      start = first <|vision_start|> if the first user turn has an image, else 2nd <|im_start|>
                 + 2; end = 2nd <|im_end|>. (An image first seen in a later turn leaves the span on the
                 first user turn's text: docs/design.md's rule would give start > end there, and falling back
                 to every token would let training, which sees the answers, route on more than
                 inference does.) A sample without that chat structure falls back to all its tokens.
    prompt-text: the whole first user turn, 2nd <|im_start|> + 2 to 2nd <|im_end|>, text before its
                 image included; the image tokens are left out of the mean later, by span_mean's `skip`
                 (see image_tokens), so precomputed training spans stay plain ranges.
    all:         every non-padding token.
    """
    if rule not in SPAN_RULES:
        raise AwakerError(f"unknown routing span rule {rule!r}; choose from {', '.join(SPAN_RULES)}")
    batch, length = input_ids.shape
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    first_valid = _nth(valid, 1).clamp(min=0)
    last_valid = length - 1 - _nth(valid.flip(1), 1).clamp(min=0)
    if rule == "all":
        return torch.stack([first_valid, last_valid + 1], dim=1)
    vision = _nth(input_ids == tokens.vision_start, 1)
    user = _nth(input_ids == tokens.im_start, 2)
    end = _nth(input_ids == tokens.im_end, 2)
    end = torch.where(end >= 0, end, last_valid + 1)
    turn = torch.where(user >= 0, user + 2, first_valid)
    start = turn
    if rule == "prompt":
        start = torch.where((vision >= 0) & (vision < end), vision, turn)
    broken = end <= start
    start = torch.where(broken, first_valid, start)
    end = torch.where(broken, last_valid + 1, end)
    return torch.stack([start, end], dim=1)


def image_tokens(input_ids: torch.Tensor, model_config) -> torch.Tensor:
    """[B, T] bool: the image (and video) placeholder tokens, whose input embeddings are the vision
    tower's features; their ids come from the model's config."""
    ids = [getattr(model_config, name, None) for name in ("image_token_id", "video_token_id")]
    ids = torch.tensor([i for i in ids if i is not None], dtype=input_ids.dtype, device=input_ids.device)
    return torch.isin(input_ids, ids)


def span_mean(embeds: torch.Tensor, spans: torch.Tensor, attention_mask: torch.Tensor | None = None,
              skip: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of embeds [B, T, H] over each row's span (and its attention mask), summed in fp32.
    skip [B, T] bool: positions left out of the mean (the prompt-text rule's image tokens)."""
    pos = torch.arange(embeds.shape[1], device=embeds.device)
    mask = (pos[None] >= spans[:, :1]) & (pos[None] < spans[:, 1:])
    if attention_mask is not None:
        mask &= attention_mask.bool()
    if skip is not None:
        mask &= ~skip.to(mask.device)
    weights = mask.float()
    total = torch.einsum("bth,bt->bh", embeds.float(), weights)
    return (total / weights.sum(1, keepdim=True).clamp(min=1)).to(embeds.dtype)


@dataclass
class Routing:
    """The routing of one batch: per sequence b and router r, the chosen experts and their weights.

    expert_weights and global_weight already hold the combine mode (release: p², convex: p; the global
    expert gets 1 − Σp), so layers and kernels only multiply.
    """

    expert_ids: torch.Tensor  # [B, R, k] int64
    probs: torch.Tensor  # [B, R, k] fp32, the router probabilities of the chosen experts
    expert_weights: torch.Tensor  # [B, R, k] fp32
    global_weight: torch.Tensor | None  # [B, R] fp32, None without a global expert
    _plans: torch.Tensor | None = field(default=None, repr=False, compare=False)
    _views: list | None = field(default=None, repr=False, compare=False)

    def plans(self, num_slots: int) -> torch.Tensor:
        """Sequences grouped by expert, per router, for the Triton kernels: computed once per routing
        (so once per batch, not per layer or decode step)."""
        if self._plans is None:
            from ..kernels import make_plans

            self._plans = make_plans(self.expert_ids, num_slots)
        return self._plans

    def for_router(self, r: int, num_slots: int) -> tuple:
        """(expert_ids [B, k], expert_weights [B, k], global_weight [B] or None, plan [B]) of router r,
        each its own contiguous allocation, made once per routing. Slices of the [B, R, k] tensors would
        start at addresses whose alignment depends on r, and Triton compiles a kernel variant per
        alignment: separate tensors give every router the same variant (fewer compiles on a cold GPU)."""
        if self._views is None:
            self._views = self._make_views(num_slots)
        return self._views[r]

    def _make_views(self, num_slots: int) -> list:
        own = lambda t: t.clone(memory_format=torch.contiguous_format)  # noqa: E731
        plans = self.plans(num_slots)
        gw = self.global_weight
        return [(own(self.expert_ids[:, r]), own(self.expert_weights[:, r]), None if gw is None else own(gw[:, r]),
                 own(plans[r])) for r in range(self.expert_ids.shape[1])]

    def refresh_views(self, num_slots: int):
        """Recompute plans and per-router tensors in place (a static routing whose values were copied in)."""
        if self._plans is not None:
            from ..kernels import make_plans

            self._plans.copy_(make_plans(self.expert_ids, num_slots))
        if self._views is None:
            self._views = self._make_views(num_slots)
            return
        for r, (ids, ew, gw, plan) in enumerate(self._views):
            ids.copy_(self.expert_ids[:, r])
            ew.copy_(self.expert_weights[:, r])
            if gw is not None:
                gw.copy_(self.global_weight[:, r])
            plan.copy_(self._plans[r])

    @property
    def batch_size(self) -> int:
        return self.expert_ids.shape[0]

    @classmethod
    def from_probs(cls, expert_ids, probs, combine: str, global_expert: bool) -> "Routing":
        weights = probs * probs if combine == "release" else probs
        global_weight = (1.0 - probs.sum(-1)) if global_expert else None
        return cls(expert_ids, probs, weights, global_weight)

    def select(self, rows: torch.Tensor) -> "Routing":
        """The routing of a subset (or re-ordering) of the batch rows."""
        gw = None if self.global_weight is None else self.global_weight[rows]
        return Routing(self.expert_ids[rows], self.probs[rows], self.expert_weights[rows], gw)


class RoutingState:
    """Shared by every MoE layer of one model: the routing of the batch now in flight.

    A forward that starts a sequence (no KV cache yet) computes a new routing; a forward that continues
    one (decode) reuses it, so a generation is routed once, at prefill. `fixed` pins a routing
    for every forward until cleared (baking, evaluation under a chosen routing).
    """

    def __init__(self):
        self.current: Routing | None = None
        self.fixed: Routing | None = None
        self.spans: torch.Tensor | None = None  # explicit [B, 2] spans for the next prefill
        self._pending: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def routing_for(self, batch: int) -> Routing:
        routing = self.fixed or self.current
        if routing is None:
            raise AwakerError("no routing: a decode step ran before any prefill of this batch")
        if routing.batch_size != batch:
            raise AwakerError(f"routing was computed for {routing.batch_size} sequences, got {batch}")
        return routing
