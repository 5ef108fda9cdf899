"""The whole model: routing per sequence, once per request, reused by every decode step."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor

from awaker_cli.model import load_model

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
    calls = []
    hook = model.awaker_routers.register_forward_hook(lambda m, a, out: calls.append(out))
    try:
        generated = model.generate(**batch, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    finally:
        hook.remove()
    assert len(calls) == 1, "routing must run at prefill only"
    prefill_routing = calls[0]
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
