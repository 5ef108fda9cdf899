"""The generation engine against transformers' own full forward: same tokens, same routing."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor

from awaker_cli.errors import AwakerError
from awaker_cli.generate import Engine, SamplingParams
from awaker_cli.model import decoder_layers, load_base, load_model

from .conftest import needs_interpreter, randomize_adapters, solid

N = 6  # new tokens per test generation


def image_request(text, image):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


# Different lengths (left padding), with and without images, in one batch.
REQUESTS = [
    image_request("what colour is the shape ?", solid((200, 30, 30))),
    "how many shapes are there ?",
    image_request("read the digit .", solid((20, 200, 40), (56, 112))),
    [{"role": "system", "content": "answer with a word ."},
     {"role": "user", "content": "describe the image in a few words please ."}],
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def moe(tiny_moe):
    """(engine, reference): the same trained-like weights; the engine merges and fuses its copy."""
    processor = AutoProcessor.from_pretrained(tiny_moe)
    reference = load_model(tiny_moe)
    randomize_adapters(reference, seed=3, scale=0.5)
    model = load_model(tiny_moe)
    randomize_adapters(model, seed=3, scale=0.5)
    return Engine(model, processor), reference


@torch.no_grad()
def full_recompute_greedy(model, inputs, n):
    """The plainest greedy loop: the whole sequence through transformers' forward at every step, no cache."""
    ids, mask, mm = inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    out, routing = [], None
    for _ in range(n):
        logits = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm, use_cache=False, **extra).logits
        if routing is None and hasattr(model, "awaker_state"):
            routing = model.awaker_state.current
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(nxt))
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
        mm = torch.cat([mm, torch.zeros_like(nxt, dtype=mm.dtype)], 1)
    return out, routing


def greedy(n=N, **kw):
    return SamplingParams(max_new_tokens=n, ignore_eos=True, **kw)


def test_mixed_batch_greedy_equals_full_recompute(moe):
    engine, reference = moe
    gens = engine.generate(REQUESTS, greedy())
    routes = {tuple(r) for r in engine.last_routing.expert_ids[:, :, 0].tolist()}
    assert len(routes) > 1, "the test needs sequences with different routes in one batch"
    for request, g in zip(REQUESTS, gens):
        want, routing = full_recompute_greedy(reference, engine.encode([request]), N)
        assert g.tokens == want
        # the routing reported is the model's own routing of this request alone
        assert torch.equal(g.routing.expert_ids, routing.expert_ids)
        torch.testing.assert_close(g.routing.probs, routing.probs)
        assert g.finish_reason == "length" and g.prompt_tokens == engine.encode([request])["input_ids"].shape[1]


def test_reported_routing_is_used_by_every_step_and_vision_runs_once(moe):
    engine, _ = moe
    model = engine.model
    layer = decoder_layers(model)[1].mlp.down_proj
    seen, calls = [], {"visual": 0, "routers": 0}

    def record(module, args):
        routing = module.routing_state.routing_for(args[0].shape[0])
        seen.append((routing.expert_ids[:, module.router_index].clone(),
                     routing.expert_weights[:, module.router_index].clone()))

    hooks = [layer.register_forward_pre_hook(record),
             model.model.visual.register_forward_hook(lambda *a: calls.__setitem__("visual", calls["visual"] + 1)),
             model.awaker_routers.register_forward_hook(lambda *a: calls.__setitem__("routers", calls["routers"] + 1))]
    try:
        gens = engine.generate(REQUESTS[:3], greedy(4))
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"visual": 1, "routers": 1}
    assert len(seen) == 4  # the prefill and three decode steps
    ids = torch.cat([g.routing.expert_ids for g in gens])[:, layer.router_index]
    weights = torch.cat([g.routing.expert_weights for g in gens])[:, layer.router_index]
    for used_ids, used_weights in seen:
        assert torch.equal(used_ids, ids) and torch.equal(used_weights, weights)


def test_pinned_routing_is_honoured(moe):
    engine, reference = moe
    engine.generate(REQUESTS[:2], greedy(1))
    swapped = engine.last_routing.select(torch.tensor([1, 0]))  # each request gets the other's routing
    assert not torch.equal(swapped.expert_ids, engine.last_routing.expert_ids)
    engine.model.awaker_state.fixed = swapped
    try:
        gens = engine.generate(REQUESTS[:2], greedy())
        assert engine.model.awaker_state.fixed is swapped
    finally:
        engine.model.awaker_state.fixed = None
    for i, (request, g) in enumerate(zip(REQUESTS, gens)):
        assert torch.equal(g.routing.expert_ids, swapped.expert_ids[i:i + 1])
        reference.awaker_state.fixed = swapped.select(torch.tensor([i]))
        try:
            assert g.tokens == full_recompute_greedy(reference, engine.encode([request]), N)[0]
        finally:
            reference.awaker_state.fixed = None


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@needs_interpreter
def test_triton_kernels_through_the_static_routing(moe, monkeypatch):
    # The GPU path: the Triton LoRA-MoE kernels (interpreted here) reading the engine's static routing
    # copy and its per-request plans (sequences grouped by expert).
    engine, _ = moe
    want = [g.tokens for g in engine.generate(REQUESTS[:3], greedy(3))]
    monkeypatch.setenv("AWAKER_KERNELS", "triton")
    assert [g.tokens for g in engine.generate(REQUESTS[:3], greedy(3))] == want


def test_dense_model_greedy_equals_full_recompute(tiny_base):
    processor = AutoProcessor.from_pretrained(tiny_base)
    reference, _ = load_base(tiny_base)
    engine = Engine(load_base(tiny_base)[0], processor)
    requests = REQUESTS[:2]
    gens = engine.generate(requests, greedy())
    for request, g in zip(requests, gens):
        assert g.routing is None
        assert g.tokens == full_recompute_greedy(reference, engine.encode([request]), N)[0]


def test_stream_yields_the_one_shot_text(moe):
    engine, _ = moe
    params = greedy(24)
    stream = engine.stream(REQUESTS[1], params)
    pieces = list(stream)
    one_shot = engine.generate([REQUESTS[1]], params)[0]
    assert len(pieces) > 1
    assert "".join(pieces) == one_shot.text == stream.result.text
    assert stream.result.tokens == one_shot.tokens


def test_stream_closed_early_keeps_partial_answer(moe):
    engine, _ = moe
    stream = engine.stream(REQUESTS[1], greedy(24))
    first = next(iter(stream))
    stream.close()
    r = stream.result
    assert r.finish_reason == "interrupted" and 0 < r.new_tokens < 24 and r.text.startswith(first)
    # the engine is fine afterwards
    assert engine.generate([REQUESTS[1]], greedy(3))[0].new_tokens == 3


def test_stop_token_ends_each_row(moe):
    engine, _ = moe
    free = engine.generate(REQUESTS[:2], greedy())
    stop = free[0].tokens[2]
    assert stop not in free[0].tokens[:2]
    saved = set(engine.stop_ids)
    engine.stop_ids = saved | {stop}
    try:
        gens = engine.generate(REQUESTS[:2], SamplingParams(max_new_tokens=N))
    finally:
        engine.stop_ids = saved
    assert gens[0].tokens == free[0].tokens[:2] and gens[0].finish_reason == "stop"
    if stop not in free[1].tokens:  # the other row goes on to the end
        assert gens[1].tokens == free[1].tokens and gens[1].finish_reason == "length"


def test_sampling_is_seeded(moe):
    engine, _ = moe
    sampled = dict(temperature=1.0, top_p=0.9, top_k=50)
    a = engine.generate(REQUESTS[:2], greedy(12, seed=7, **sampled))
    b = engine.generate(REQUESTS[:2], greedy(12, seed=7, **sampled))
    c = engine.generate(REQUESTS[:2], greedy(12, seed=8, **sampled))
    assert [g.tokens for g in a] == [g.tokens for g in b] and a[0].seed == 7
    assert [g.tokens for g in a] != [g.tokens for g in c]
    top1 = engine.generate(REQUESTS[:2], greedy(12, temperature=1.0, top_k=1, seed=1))
    assert [g.tokens for g in top1] == [g.tokens for g in engine.generate(REQUESTS[:2], greedy(12))]


def test_context_limit(moe, monkeypatch):
    engine, _ = moe
    length = engine.encode([REQUESTS[1]])["input_ids"].shape[1]
    monkeypatch.setattr(engine, "context", length)
    with pytest.raises(AwakerError, match="longer than the model's context"):
        engine.generate([REQUESTS[1]], greedy())
    monkeypatch.setattr(engine, "context", length + 3)  # room for 3 new tokens only
    assert engine.generate([REQUESTS[1]], greedy(50))[0].new_tokens == 3


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2)])
def test_bad_sampling_params(moe, bad):
    with pytest.raises(AwakerError):
        moe[0].generate(["hi"], SamplingParams(**bad))


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_bench_smoke_runs(capsys, quantize):
    spec = importlib.util.spec_from_file_location("bench_decode", Path(__file__).parents[1] / "bench" / "decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    info = bench.main(["--smoke", "--batches", "1,2", "--new-tokens", "3", "--prompt-tokens", "24",
                       "--quantize", quantize])
    cases = {(r["model"], r["case"]) for r in info["results"]}
    assert cases == {(m, c) for m in ("dense", "awaker") for c in ("b1", "b1+image", "b2-mixed")}
    assert all(r["tokens_per_s"] > 0 and r["new_tokens"] == 3 for r in info["results"])
    assert info["quantize"] == quantize


def without_reuse(engine, request, params):
    engine.reuse_prefix = False
    try:
        return engine.generate([request], params)[0]
    finally:
        engine.reuse_prefix = True


def test_a_repeated_request_prefills_only_its_last_token(moe):
    engine, _ = moe
    first = engine.generate([REQUESTS[0]], greedy())[0]
    again = engine.generate([REQUESTS[0]], greedy())[0]
    assert first.cached_prompt_tokens == 0 and again.cached_prompt_tokens == again.prompt_tokens - 1
    assert again.tokens == first.tokens == without_reuse(engine, REQUESTS[0], greedy()).tokens
    assert torch.equal(again.routing.expert_ids, first.routing.expert_ids)


def test_other_pixels_or_a_pinned_routing_prefill_everything(moe):
    engine, _ = moe
    engine.generate([REQUESTS[0]], greedy())
    other = image_request("what colour is the shape ?", solid((30, 30, 200)))  # same tokens, other image
    g = engine.generate([other], greedy())[0]
    assert g.cached_prompt_tokens == 0 and g.tokens == without_reuse(engine, other, greedy()).tokens
    pinned = engine.last_routing
    engine.model.awaker_state.fixed = pinned
    try:
        assert engine.generate([other], greedy())[0].cached_prompt_tokens == 0
        assert engine.generate([other], greedy())[0].cached_prompt_tokens == 0  # pinned runs are not kept either
    finally:
        engine.model.awaker_state.fixed = None
    assert engine.generate([other], greedy())[0].cached_prompt_tokens == 0


def test_batches_never_reuse(moe):
    engine, _ = moe
    engine.generate(REQUESTS[:2], greedy())
    assert [g.cached_prompt_tokens for g in engine.generate(REQUESTS[:2], greedy())] == [0, 0]


def test_graph_fallback_is_said_once_with_why(moe, monkeypatch, capsys):
    engine, _ = moe
    want = engine.generate(REQUESTS[:1], greedy(3))[0].tokens

    def fail(buf):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(engine, "_capture", fail)
    monkeypatch.setattr(engine, "use_graphs", True)  # as on a GPU (the step itself runs on the CPU here)
    monkeypatch.setattr(engine, "graphs_off", None)
    capsys.readouterr()
    assert engine.generate(REQUESTS[:1], greedy(3))[0].tokens == want
    assert engine.generate(REQUESTS[:1], greedy(3))[0].tokens == want
    err = capsys.readouterr().err
    assert err.count("decoding without CUDA graphs") == 1 and "stream is capturing" in err
    assert not engine.use_graphs and "RuntimeError" in engine.graphs_off


def test_warm_up_runs_and_leaves_answers_alone(moe, capsys):
    engine, _ = moe
    want = engine.generate(REQUESTS[:2], greedy(3))
    capsys.readouterr()
    took = engine.warm_up((1, 2))
    err = capsys.readouterr().err
    assert "warming up" in err and "warmed up in" in err and took < 30
    again = engine.generate(REQUESTS[:2], greedy(3))
    assert [g.tokens for g in again] == [g.tokens for g in want] and again[0].cached_prompt_tokens == 0
