"""`awaker chat`: one-shot answers, the interactive session driven through stdin, and bad input."""
from __future__ import annotations

import io
import itertools
import json
import shutil
import sys

import pytest
import torch

from awaker_cli.cli import run
from awaker_cli.generate import ChatSession, SamplingParams, interactive, load_engine, stats_line

from .conftest import solid

NEW = ["--max-new-tokens", "5", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(tiny_moe):
    return load_engine(str(tiny_moe))


@pytest.fixture(scope="module")
def red(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "red.png"
    solid((220, 20, 20)).save(path)
    return path


def answer(engine, messages, n=5):
    return engine.generate([messages], SamplingParams(max_new_tokens=n))[0]


def user(text, image=None):
    parts = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": text}]
    return {"role": "user", "content": parts}


def test_one_shot_json_with_image(tiny_moe, engine, red, capsys):
    assert run(["chat", str(tiny_moe), "-p", "what colour is it ?", "--image", str(red), "--json", *NEW]) == 0
    out = json.loads(capsys.readouterr().out)
    want = answer(engine, [user("what colour is it ?", red)])
    assert out["tokens"] == want.tokens and out["text"] == want.text
    assert out["prompt_tokens"] == want.prompt_tokens and out["new_tokens"] == len(want.tokens)
    assert set(out["timings"]) == {"time_to_first_token_s", "decode_s", "tokens_per_s"}
    groups = out["routing"]["groups"]
    assert [g["router"] for g in groups] == ["o_proj", "gate_proj"]
    assert groups[1]["drives"] == ["gate_proj", "up_proj", "down_proj"]
    reported = torch.tensor([[entry["experts"] for entry in g["per_layer"]] for g in groups])  # [groups, layers, k]
    used = want.routing.expert_ids[0].view(-1, len(groups), 1).transpose(0, 1)  # routers are layer-major
    assert torch.equal(reported, used)


def test_one_shot_text_and_routing_summary(tiny_moe, engine, capsys):
    assert run(["chat", str(tiny_moe), "-p", "hello", "--show-routing", *NEW]) == 0
    out, err = capsys.readouterr()
    assert out == answer(engine, [user("hello")]).text + "\n"
    assert "prompt tokens" in err and "tok/s" in err
    assert "o_proj router: expert" in err and "gate_proj router (also up_proj, down_proj): expert" in err


def test_dense_model_chats_without_routing(tiny_base, capsys):
    assert run(["chat", str(tiny_base), "-p", "hello", "--json", *NEW]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["routing"] is None and len(out["tokens"]) == 5


def test_interactive_session_through_stdin(tiny_moe, engine, red, capsys, monkeypatch):
    script = (f"hello\n/image {red}\nwhat is it ?\n/routing\n/image /no/such.png\n/reset\n"
              "hello\n/quit\nnever read\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert run(["chat", str(tiny_moe), *NEW]) == 0
    out, err = capsys.readouterr()
    first = answer(engine, [user("hello")]).text
    second = answer(engine, [user("hello"), {"role": "assistant", "content": first}, user("what is it ?", red)]).text
    assert out == f"{first}\n{second}\n{first}\n"  # multi-turn history, the image, then a fresh start
    assert "o_proj router: expert" in err and "(conversation cleared)" in err
    assert "error: /no/such.png: no such image file" in err


def test_ctrl_c_stops_the_answer_not_the_chat(engine):
    session = ChatSession(engine, params=SamplingParams(max_new_tokens=40, ignore_eos=True))
    lines = iter(["hello", "hello", "/quit"])
    written, notes = [], []

    def write(piece):
        if not written:  # Ctrl-C during the first answer
            written.append(piece)
            raise KeyboardInterrupt
        written.append(piece)

    interactive(session, read_line=lambda: next(lines), write=write, info=notes.append)
    assert any("stopped" in n for n in notes)
    partial, full = session.history[1]["content"], session.history[3]["content"]
    assert len(session.history) == 4 and session.last.finish_reason == "length"
    assert partial.startswith(written[0]) and len(partial) < len(full)


def _strip_processor_files(src, dst):
    shutil.copytree(src, dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json"):
        (dst / name).unlink(missing_ok=True)
    return dst


@pytest.mark.parametrize("case", ["missing image", "unreadable image", "no processor files", "prompt too long",
                                  "json without prompt", "bad sampling"])
def test_bad_input_is_one_line_and_exit_2(case, tiny_moe, tmp_path, capsys):
    model, extra = str(tiny_moe), ["-p", "hi"]
    if case == "missing image":
        extra += ["--image", str(tmp_path / "nope.png")]
    elif case == "unreadable image":
        (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
        extra += ["--image", str(tmp_path / "broken.png")]
    elif case == "no processor files":
        model = str(_strip_processor_files(tiny_moe, tmp_path / "model"))
    elif case == "prompt too long":
        extra = ["-p", "0 1 2 3 4 5 6 7 8 9 " * 300]
    elif case == "json without prompt":
        extra = ["--json"]
    elif case == "bad sampling":
        extra += ["--top-p", "0"]
    assert run(["chat", model, *extra, *NEW]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err


# ---- later turns continue from the KV cache of the conversation so far ----

@pytest.fixture(scope="module")
def pair(random_moe):
    """Two engines on the same weights (random adapters: routes differ by input): one reuses the KV
    cache of earlier turns, the other prefills every turn from scratch."""
    reuse = load_engine(str(random_moe), device="cpu")
    fresh = load_engine(str(random_moe), device="cpu")
    fresh.reuse_prefix = False
    return reuse, fresh


def converse(engine, turns, n=6):
    """The Generation of each turn of one greedy ChatSession; turns are (text, image or None)."""
    session = ChatSession(engine, params=SamplingParams(max_new_tokens=n, ignore_eos=True))
    gens = []
    for text, image in turns:
        if image is not None:
            session.add_image(image)
        for _ in session.ask(text):
            pass
        gens.append(session.last)
    return session, gens


def assert_same_answers(got, want):
    for g, w in zip(got, want, strict=True):
        assert g.tokens == w.tokens and g.text == w.text and g.prompt_tokens == w.prompt_tokens
        assert torch.equal(g.routing.expert_ids, w.routing.expert_ids)
        torch.testing.assert_close(g.routing.probs, w.routing.probs)
        assert w.cached_prompt_tokens == 0


def test_later_turns_reuse_the_cache_and_answer_the_same(pair, red):
    reuse, fresh = pair
    turns = [("colour ?", red), ("sure ?", None), ("again", None)]  # short: every turn fits the same cache bucket
    calls = []
    hook = reuse.model.model.visual.register_forward_hook(lambda *a: calls.append(1))
    try:
        _, got = converse(reuse, turns)
    finally:
        hook.remove()
    _, want = converse(fresh, turns)
    assert_same_answers(got, want)
    assert got[0].cached_prompt_tokens == 0
    for before, g in itertools.pairwise(got):  # at least the previous prompt (its image included) was reused
        assert before.prompt_tokens <= g.cached_prompt_tokens < g.prompt_tokens
    assert len(calls) == 1  # the image went through the vision tower once, in turn 1


def test_a_conversation_outgrowing_its_cache_keeps_reusing(pair, red, monkeypatch):
    """With 16-token cache buckets every turn needs a bigger cache: the shared K/V are copied over."""
    reuse, fresh = pair
    for engine in pair:
        monkeypatch.setattr(engine, "LENGTH_BUCKET", 16)
    turns = [("colour ?", red), ("are you quite sure about that ?", None), ("and now, once more ?", None)]
    _, got = converse(reuse, turns)
    _, want = converse(fresh, turns)
    assert_same_answers(got, want)
    assert all(g.cached_prompt_tokens >= before.prompt_tokens for before, g in itertools.pairwise(got))
    assert len({(b.batch, b.length) for b in reuse._buffers.values()}) == 2  # it did change buckets


def test_an_image_in_a_later_turn_prefills_everything_again(pair, red):
    reuse, fresh = pair
    turns = [("hi", None), ("colour ?", red), ("now ?", None)]
    _, got = converse(reuse, turns)
    _, want = converse(fresh, turns)
    assert_same_answers(got, want)
    assert [g.cached_prompt_tokens > 0 for g in got] == [False, False, True]


def test_an_edited_conversation_prefills_everything_again(pair):
    reuse, fresh = pair
    session, got = converse(reuse, [("hello", None), ("tell me more", None)])
    assert got[1].cached_prompt_tokens > 0
    # a different first user turn (its routing span): nothing reused, same answer as from scratch
    edited = [dict(m) for m in session.history]
    edited[0] = user("good morning")
    request = edited + [user("tell me more")]
    g = reuse.generate([request], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    w = fresh.generate([request], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    assert g.cached_prompt_tokens == 0 and g.tokens == w.tokens
    # /reset, then another question
    session.reset()
    for _ in session.ask("what is two and two ?"):
        pass
    assert session.last.cached_prompt_tokens == 0
    assert session.last.tokens == converse(fresh, [("what is two and two ?", None)])[1][0].tokens


def test_stats_line_shows_cached_prompt_tokens(pair):
    _, gens = converse(pair[0], [("hello", None), ("more", None)], n=2)
    assert "cached" not in stats_line(gens[0])
    assert f"({gens[1].cached_prompt_tokens} cached)" in stats_line(gens[1])
    assert gens[1].stats()["cached_prompt_tokens"] == gens[1].cached_prompt_tokens


def test_dense_model_reuses_the_cache_too(tiny_base):
    reuse, fresh = load_engine(str(tiny_base), device="cpu"), load_engine(str(tiny_base), device="cpu")
    fresh.reuse_prefix = False
    turns = [("hi", None), ("more", None), ("again", None)]
    got, want = converse(reuse, turns)[1], converse(fresh, turns)[1]
    assert [g.tokens for g in got] == [w.tokens for w in want]
    assert [g.cached_prompt_tokens > 0 for g in got] == [False, True, True]
