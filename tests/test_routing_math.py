"""The layers and routers against a direct evaluation of docs/design.md section 1's formulas."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from awaker_cli.errors import AwakerError
from awaker_cli.model import MoELoRALinear, RouterBank, Routing, RoutingState, SpanTokens, routing_spans, span_mean
from awaker_cli.model.config import SPAN_RULES, AwakerConfig
from awaker_cli.model.routing import image_tokens
from awaker_cli.train.recipe import load_recipe


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


# Token ids of the toy sequences below: pad 0, <|im_start|> 1, <|im_end|> 2, <|vision_start|> 3,
# <|vision_end|> 4, <|image_pad|> 6; the rest is text.
IMAGE_PAD = 6
TOY_CONFIG = SimpleNamespace(image_token_id=IMAGE_PAD, video_token_id=None)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_prompt_text_span_leaves_image_tokens_out(padding):
    tok = SpanTokens(vision_start=3, im_start=1, im_end=2)
    with_image = [1, 9, 9, 2, 1, 8, 7, 3, 6, 6, 6, 4, 9, 5, 2, 1, 5, 7]
    text_only = [1, 9, 9, 2, 1, 8, 7, 9, 5, 8, 2, 1, 5, 7]
    rows = [with_image, text_only]
    length = max(map(len, rows))
    pad = [[0] * (length - len(r)) for r in rows]
    ids = torch.tensor([p + r if padding == "left" else r + p for p, r in zip(pad, rows)])
    mask = (ids != 0).long()
    spans = routing_spans(ids, mask, tok, rule="prompt-text")
    prompt = routing_spans(ids, mask, tok, rule="prompt")
    assert torch.equal(spans[1], prompt[1]) and spans[0, 1] == prompt[0, 1]
    assert spans[0, 0] == prompt[0, 0] - 1  # the whole user turn: it starts before the image
    embeds = torch.randn(2, length, 8)
    skip = image_tokens(ids, TOY_CONFIG)
    m = span_mean(embeds, spans, mask, skip)
    # by hand: the with-image row's user turn is 7 <|vision_start|> pad pad pad <|vision_end|> 9 5; its
    # text tokens are all but the three pads (the vision markers stay: they carry no image features)
    off = [len(p) if padding == "left" else 0 for p in pad]
    keep0 = [off[0] + i for i in (6, 7, 11, 12, 13)]
    keep1 = [off[1] + i for i in (6, 7, 8, 9)]  # no image: the prompt rule's user text, unchanged
    torch.testing.assert_close(m[0], embeds[0, keep0].mean(0))
    torch.testing.assert_close(m[1], embeds[1, keep1].mean(0))
    # the text-only row is exactly what the prompt rule gives
    assert torch.equal(m[1], span_mean(embeds, spans, mask)[1])


def test_prompt_text_sees_the_question_before_the_image():
    """'What colour is this? <image>': prompt starts at the image (docs/design.md), prompt-text keeps the
    question, so two such questions about the same image route differently."""
    tok = SpanTokens(vision_start=3, im_start=1, im_end=2)
    rows = [[1, 9, 2, 1, 8, 7, q, 5, 3, 6, 6, 4, 2, 1, 5, 7] for q in (10, 11)]
    ids = torch.tensor(rows)
    embeds = torch.randn(1, 16, 8).expand(2, 16, 8).clone()
    embeds[1, 6] = torch.randn(8)  # only the question's first word differs
    skip = image_tokens(ids, TOY_CONFIG)
    prompt = span_mean(embeds, routing_spans(ids, None, tok, rule="prompt"), None)
    text = span_mean(embeds, routing_spans(ids, None, tok, rule="prompt-text"), None, skip)
    assert torch.equal(prompt[0], prompt[1])  # the release's rule sees only the image
    assert not torch.equal(text[0], text[1])
    torch.testing.assert_close(text[0], embeds[0, [5, 6, 7, 8, 11]].mean(0))


@pytest.mark.parametrize("rule", ["prompt", "prompt-text"])
def test_image_in_a_later_turn_keeps_the_first_user_turn(rule):
    """A conversation whose first image comes in its second user turn routes on the first user turn's
    text, in training (answers included in the sequence) and at inference (prompt only) alike."""
    tok = SpanTokens(vision_start=3, im_start=1, im_end=2)
    inference = [1, 9, 2, 1, 8, 7, 9, 5, 2, 1, 5, 7, 9, 2, 1, 8, 7, 3, 6, 4, 9, 2, 1, 5, 7]
    training = inference + [9, 9, 2]
    for seq in (inference, training):
        spans = routing_spans(torch.tensor([seq]), None, tok, rule=rule)
        assert spans.tolist() == [[5, 8]]


def test_span_mean_without_skips_is_bit_identical():
    embeds = torch.randn(3, 7, 5, dtype=torch.bfloat16)
    spans = torch.tensor([[1, 4], [0, 7], [2, 6]])
    mask = torch.ones(3, 7, dtype=torch.long)
    none = torch.zeros(3, 7, dtype=torch.bool)
    assert torch.equal(span_mean(embeds, spans, mask), span_mean(embeds, spans, mask, none))


def test_image_tokens_read_ids_from_the_config():
    ids = torch.tensor([[5, 6, 7, 8]])
    assert image_tokens(ids, SimpleNamespace(image_token_id=6, video_token_id=8)).tolist() == [[False, True, False, True]]
    assert image_tokens(ids, SimpleNamespace(image_token_id=7)).tolist() == [[False, False, True, False]]


def test_unknown_span_rule_is_refused():
    with pytest.raises(AwakerError, match="unknown routing span rule"):
        routing_spans(torch.tensor([[1, 2]]), None, SpanTokens(3, 1, 2), rule="text")


def test_recipes_and_configs_accept_prompt_text():
    assert "prompt-text" in SPAN_RULES
    r = load_recipe("demo-stage2", ["adapter.routing_span=prompt-text"])
    assert r.adapter.routing_span == "prompt-text"
    assert AwakerConfig(routing_span="prompt-text").validate().routing_span == "prompt-text"
    with pytest.raises(AwakerError, match="routing_span"):
        load_recipe("demo-stage2", ["adapter.routing_span=text"])
