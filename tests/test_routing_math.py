"""The layers and routers against a direct evaluation of DESIGN.md section 1's formulas."""
from __future__ import annotations

import pytest
import torch

from awaker_cli.model import MoELoRALinear, RouterBank, Routing, RoutingState, SpanTokens, routing_spans, span_mean


def direct_router(x, norm_w, gate_w, gate_b, eps, temperature):
    """One router at a time, as the release computes it."""
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * norm_w
    logits = normed @ gate_w.T + gate_b
    return torch.softmax(logits.float() / temperature, -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_router_bank_matches_per_router_formula(dtype):
    torch.manual_seed(0)
    R, E, H, B = 6, 4, 24, 5
    bank = RouterBank(R, H, E, eps=1e-6, temperature=0.7, top_k=2, noise_std=0.1, combine="release",
                      global_expert=True, dtype=dtype).eval()
    with torch.no_grad():
        bank.norm_weight.copy_(torch.rand(R, H, dtype=dtype) + 0.5)
    x = torch.randn(B, H, dtype=dtype) * 3
    routing = bank(x)
    for r in range(R):
        probs = direct_router(x, bank.norm_weight[r], bank.gate_weight[r], bank.gate_bias[r], 1e-6, 0.7)
        top_p, top_i = probs.topk(2, -1)
        assert torch.equal(routing.expert_ids[:, r], top_i)
        torch.testing.assert_close(routing.probs[:, r], top_p)
        torch.testing.assert_close(routing.expert_weights[:, r], top_p**2)
        torch.testing.assert_close(routing.global_weight[:, r], 1 - top_p.sum(-1))


def test_router_noise_only_in_training():
    bank = RouterBank(2, 8, 4, eps=1e-6, temperature=1.0, top_k=1, noise_std=0.5, combine="convex",
                      global_expert=True)
    x = torch.randn(3, 8)
    bank.eval()
    assert torch.equal(bank(x).probs, bank(x).probs)
    bank.train()
    assert not torch.equal(bank(x).probs, bank(x).probs)


@pytest.mark.parametrize("combine", ["release", "convex"])
@pytest.mark.parametrize("global_expert", [True, False])
def test_moe_linear_matches_formula(combine, global_expert):
    torch.manual_seed(1)
    B, T, IN, OUT, r, E = 3, 5, 12, 10, 4, 3
    base = torch.nn.Linear(IN, OUT, dtype=torch.float64)
    state = RoutingState()
    layer = MoELoRALinear(base, r, alpha=8.0, num_experts=E, global_expert=global_expert, router_index=1,
                          state=state, dtype=torch.float64)
    with torch.no_grad():
        layer.lora_B.normal_()
    # Sequence b routes to expert ids[b] with probability p[b]; every sequence differs.
    ids = torch.tensor([2, 0, 1])
    p = torch.tensor([0.9, 0.35, 0.6], dtype=torch.float64)
    full_ids = torch.stack([ids.flip(0), ids], 1)[..., None]  # router 0 is someone else's
    full_p = torch.stack([p.flip(0), p], 1)[..., None]
    state.current = Routing.from_probs(full_ids, full_p, combine, global_expert)
    x = torch.randn(B, T, IN, dtype=torch.float64)
    y = layer(x)
    s = 8.0 / r
    for b in range(B):
        A, Bm = layer.lora_A[ids[b]], layer.lora_B[ids[b]]
        w = p[b] ** 2 if combine == "release" else p[b]
        expect = base(x[b]) + w * s * (x[b] @ A.T @ Bm.T)
        if global_expert:
            expect = expect + (1 - p[b]) * s * (x[b] @ layer.lora_A[E].T @ layer.lora_B[E].T)
        torch.testing.assert_close(y[b], expect)


def test_spans_follow_the_release_rule():
    tok = SpanTokens(vision_start=3, im_start=1, im_end=2)
    pad = 0
    # system turn, then user turn with an image, then the assistant prompt; left-padded
    with_image = [pad, pad, 1, 9, 9, 2, 1, 8, 7, 3, 6, 6, 4, 9, 2, 1, 5, 7]
    text_only = [1, 9, 9, 2, 1, 8, 7, 9, 9, 9, 9, 9, 9, 9, 2, 1, 5, 7]
    no_chat = [pad, pad, pad, pad, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9]
    ids = torch.tensor([with_image, text_only, no_chat])
    mask = (ids != pad).long()
    spans = routing_spans(ids, mask, tok)
    assert spans.tolist() == [[9, 14], [6, 14], [4, 18]]
    assert routing_spans(ids, mask, tok, rule="all").tolist() == [[2, 18], [0, 18], [4, 18]]


def test_span_mean_is_the_mean_over_the_span():
    embeds = torch.randn(2, 6, 4)
    spans = torch.tensor([[1, 4], [0, 6]])
    m = span_mean(embeds, spans)
    torch.testing.assert_close(m[0], embeds[0, 1:4].mean(0))
    torch.testing.assert_close(m[1], embeds[1].mean(0))
