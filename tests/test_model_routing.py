"""The whole model: routing per sequence, once per request, reused by every decode step."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoProcessor

from awaker_cli.generate import Engine, SamplingParams
from awaker_cli.model import SpanTokens, load_model, span_mean
from awaker_cli.train.data import Encoder, collate, read_records

from .conftest import chat_inputs, randomize_adapters, solid

PROMPTS = ["what colour is the shape ?", "how many shapes are there ?", "read the digit .", "describe the image ."]
IMAGES = [solid((200, 30, 30)), solid((20, 200, 40), (56, 112)), solid((250, 250, 250)), solid((10, 10, 10))]


@pytest.fixture(scope="module")
def trained_like(tiny_moe):
    model = load_model(tiny_moe)
    randomize_adapters(model, seed=3, scale=0.5)
    return model, AutoProcessor.from_pretrained(tiny_moe)


@torch.no_grad()
def test_batch_routes_differ_and_match_single_runs(trained_like):
    model, processor = trained_like
    batch = chat_inputs(processor, PROMPTS, IMAGES)
    logits = model(**batch).logits
    routing = model.awaker_state.current
    assert len({tuple(r) for r in routing.expert_ids[:, :, 0].tolist()}) > 1, "the test needs mixed routes"
    for i in range(len(PROMPTS)):
        single = chat_inputs(processor, [PROMPTS[i]], [IMAGES[i]])
        single_logits = model(**single).logits[0]
        assert torch.equal(model.awaker_state.current.expert_ids[0], routing.expert_ids[i])
        n = single_logits.shape[0]  # left padding: the sequence sits at the end of its batch row
        torch.testing.assert_close(logits[i, -n:], single_logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_routing_computed_once_and_reused_in_decode(trained_like):
    model, processor = trained_like
    batch = chat_inputs(processor, PROMPTS[:2], IMAGES[:2])
    calls, used = [], []  # router runs; the routing each forward (prefill, then every decode step) used
    hooks = [model.awaker_routers.register_forward_hook(lambda m, a, out: calls.append(out)),
             model.register_forward_hook(lambda m, a, out: used.append(model.awaker_state.current))]
    try:
        generated = model.generate(**batch, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(calls) == 1, "routing must run at prefill only"
    prefill_routing = calls[0]
    assert len({tuple(r) for r in prefill_routing.expert_ids[:, :, 0].tolist()}) > 1, "the test needs mixed routes"
    assert len(used) == 6  # one prefill + 5 decode steps
    for step in used:
        assert torch.equal(step.expert_ids, prefill_routing.expert_ids)
        assert torch.equal(step.expert_weights, prefill_routing.expert_weights)
    # A full recompute (no cache) of every step routes the grown sequence from its (unchanged) prompt
    # span, so it must pick the same experts and the same tokens.
    ids, mask = batch["input_ids"], batch["attention_mask"]
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    mm = batch["mm_token_type_ids"]
    for _ in range(6):
        out = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm, use_cache=False, **extra)
        assert torch.equal(model.awaker_state.current.expert_ids, prefill_routing.expert_ids)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
        mm = torch.cat([mm, torch.zeros_like(nxt, dtype=mm.dtype)], 1)
    assert torch.equal(ids, generated)


@torch.no_grad()
def test_fixed_routing_overrides(trained_like):
    model, processor = trained_like
    batch = chat_inputs(processor, PROMPTS[:2], IMAGES[:2])
    model(**batch)
    natural = model.awaker_state.current
    forced = natural.select(torch.tensor([1, 0]))  # swap the two sequences' routes
    model.awaker_state.fixed = forced
    try:
        swapped = model(**batch).logits
    finally:
        model.awaker_state.fixed = None
    assert not torch.allclose(swapped, model(**batch).logits)


def prompt_text_model(path):
    """tiny_moe with trained-like adapters, routed by the prompt-text span rule."""
    model = load_model(path)
    randomize_adapters(model, seed=3, scale=0.5)
    model.awaker_config = dataclasses.replace(model.awaker_config, routing_span="prompt-text")
    return model


@torch.no_grad()
def test_prompt_text_routes_alike_through_training_spans_and_the_hook(tiny_moe, tiny_records):
    model = prompt_text_model(tiny_moe)
    processor = AutoProcessor.from_pretrained(tiny_moe)
    ids = model.awaker_config.span_token_ids
    encoder = Encoder(processor, cutoff_len=None, span_rule="prompt-text", min_pixels=56 * 56, max_pixels=112 * 112,
                      span_tokens=SpanTokens(ids["vision_start"], ids["im_start"], ids["im_end"]))
    records, _ = read_records([tiny_records])
    batch = collate([encoder(r) for r in records[:8]], processor.tokenizer.pad_token_id or 0)  # right-padded
    batch.pop("labels")
    spans = batch.pop("spans")
    seen = {}
    hooks = [model.model.language_model.register_forward_pre_hook(
                 lambda m, a, kw: seen.__setitem__("embeds", kw["inputs_embeds"]), with_kwargs=True),
             model.awaker_routers.register_forward_hook(lambda m, a, out: seen.__setitem__("mean", a[0]))]
    try:
        model.awaker_state.spans = spans  # as training passes its Encoder's spans
        model(**batch)
        trained, trained_mean = model.awaker_state.current, seen["mean"]
        model(**batch)  # the hook finds the spans itself, as chat and eval do
    finally:
        for h in hooks:
            h.remove()
    hooked, embeds = model.awaker_state.current, seen["embeds"]
    assert torch.equal(trained_mean, seen["mean"])
    assert torch.equal(trained.expert_ids, hooked.expert_ids) and torch.equal(trained.probs, hooked.probs)
    # by hand: the mean over the span's non-padding tokens that are not image tokens
    image = batch["input_ids"] == model.config.image_token_id
    prompt_mean = span_mean(embeds, spans, batch["attention_mask"])  # the prompt rule, image tokens included
    for b, (start, end) in enumerate(spans.tolist()):
        keep = [t for t in range(start, end) if batch["attention_mask"][b, t] and not image[b, t]]
        torch.testing.assert_close(seen["mean"][b], embeds[b, keep].float().mean(0))
        if image[b].any():
            assert not torch.allclose(seen["mean"][b], prompt_mean[b])
        else:  # a text-only record: the prompt rule's mean exactly
            assert torch.equal(seen["mean"][b], prompt_mean[b])
    assert image.any(1).sum() not in (0, len(spans)), "the test needs records with and without images"


def test_prompt_text_engine_prefill_routes_as_the_model(tiny_moe):
    processor = AutoProcessor.from_pretrained(tiny_moe)
    reference = prompt_text_model(tiny_moe)
    engine = Engine(prompt_text_model(tiny_moe), processor)
    requests = [[{"role": "user", "content": [{"type": "image", "image": IMAGES[0]}, {"type": "text", "text": p}]}]
                for p in PROMPTS[:2]] + PROMPTS[2:]  # left-padded, with and without images
    gens = engine.generate(requests, SamplingParams(max_new_tokens=1, ignore_eos=True))
    with torch.no_grad():
        for request, g in zip(requests, gens):
            reference(**engine.encode([request]))
            assert torch.equal(g.routing.expert_ids, reference.awaker_state.current.expert_ids)
            torch.testing.assert_close(g.routing.probs, reference.awaker_state.current.probs)


def test_continuation_is_recognised_whatever_the_cache_argument_is_called():
    """transformers 5.24 renamed generate's `past_key_values` to `cache`; the decision must not care."""
    from transformers import DynamicCache

    from awaker_cli.model.build import continues_sequences

    ids = torch.ones(2, 1, dtype=torch.long)
    cache = DynamicCache()
    assert not continues_sequences(ids, (), {"cache": cache, "attention_mask": torch.ones(2, 1)})
    cache.update(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4), 0)  # 3 tokens cached in layer 0
    for kwargs in ({"past_key_values": cache}, {"cache": cache}, {"kv": cache}):
        assert continues_sequences(ids, (), kwargs)
    assert continues_sequences(ids, (ids, cache), {})
    assert continues_sequences(ids, (), {"attention_mask": torch.ones(2, 4)})  # mask covers cached tokens
    assert continues_sequences(ids, (), {"cache_position": torch.tensor([3])})
    assert not continues_sequences(ids, (), {"cache_position": torch.tensor([0]), "attention_mask": torch.ones(2, 1)})
