"""`awaker serve`: the real server on 127.0.0.1 driven by the official openai client; answers equal the
engine's one-at-a-time answers (and `awaker chat --json`), concurrent requests share decode steps."""
from __future__ import annotations

import base64
import contextlib
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx  # the HTTP client the openai client itself uses
import openai
import pytest
import uvicorn

from awaker_cli.cli import run
from awaker_cli.generate import SamplingParams, load_engine, routing_report
from awaker_cli.serve import Job, Scheduler, create_app

from .conftest import NEW_FAMILIES, solid

N = 8  # max_tokens of the test requests
M = 32  # of the concurrent ones: long enough that they overlap
KEY = "test-key"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(random_moe):
    return load_engine(str(random_moe), device="cpu")


@contextlib.contextmanager
def running(scheduler, api_key=None, allow_local_images=None):
    """A real uvicorn server in a thread on a free loopback port; yields its base URL."""
    app = create_app(scheduler, model_name="tiny", api_key=api_key, allow_local_images=allow_local_images)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server(random_moe, tmp_path_factory):
    """(base_url, scheduler, allowed image dir) of a server with an API key, its scheduler running."""
    images = tmp_path_factory.mktemp("allowed")
    solid((10, 200, 30)).save(images / "green.png")
    engine = load_engine(str(random_moe), device="cpu")
    scheduler = Scheduler(engine, max_batch=16, max_context=512, max_queue=64)
    scheduler.start()
    with running(scheduler, KEY, str(images)) as base:
        yield base, scheduler, images
    scheduler.stop()
    assert not scheduler.thread.is_alive()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def data_url(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png(image)).decode()


def api_messages(text, image=None):
    parts = [{"type": "text", "text": text}]
    if image is not None:
        parts.insert(0, {"type": "image_url", "image_url": {"url": data_url(image)}})
    return [{"role": "user", "content": parts}]


def engine_messages(text, image=None):
    parts = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


def alone(engine, text, image=None, n=N, **kw):
    return engine.generate([engine_messages(text, image)], SamplingParams(max_new_tokens=n, **kw))[0]


def slow_steps(monkeypatch, scheduler, seconds):
    """Each decode step made `seconds` slower: answers overlap in time however loaded the machine is."""
    step = scheduler._step
    monkeypatch.setattr(scheduler, "_step", lambda: (time.sleep(seconds), step()))


def test_plain_and_streamed_answers_with_an_image_equal_chat(server, client, random_moe, tmp_path, capsys):
    red = solid((220, 20, 20))
    red.save(tmp_path / "red.png")
    assert run(["chat", str(random_moe), "-p", "what colour is it ?", "--image", str(tmp_path / "red.png"), "--json",
                "--max-new-tokens", str(N), "--device", "cpu"]) == 0
    want = json.loads(capsys.readouterr().out)

    r = client.chat.completions.create(model="tiny", messages=api_messages("what colour is it ?", red),
                                       max_tokens=N, temperature=0, seed=1)
    assert r.choices[0].message.content == want["text"]
    assert r.usage.prompt_tokens == want["prompt_tokens"] and r.usage.completion_tokens == want["new_tokens"]
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    assert r.model_extra["awaker"]["routing"] == want["routing"]
    assert r.choices[0].finish_reason == {"stop": "stop", "length": "length"}[want["finish_reason"]]

    pieces, last = [], None
    for chunk in client.chat.completions.create(model="tiny", messages=api_messages("what colour is it ?", red),
                                                max_tokens=N, temperature=0, stream=True):
        pieces.append(chunk.choices[0].delta.content or "")
        last = chunk
    assert "".join(pieces) == want["text"]
    assert last.model_extra["awaker"]["routing"] == want["routing"] and last.usage.completion_tokens == want["new_tokens"]


def test_sampling_with_a_seed_and_a_local_image_equal_the_engine(server, client, reference):
    base, _, images = server
    green = solid((10, 200, 30))
    want = alone(reference, "describe it .", green, temperature=0.9, top_p=0.9, seed=7)
    r = client.chat.completions.create(
        model="tiny", max_tokens=N, temperature=0.9, top_p=0.9, seed=7,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(images / "green.png")}},
                                               {"type": "text", "text": "describe it ."}]}])
    assert r.choices[0].message.content == want.text and r.model_extra["awaker"]["seed"] == 7


def test_stop_strings_cut_the_answer(server, client, reference):
    full = alone(reference, "say something .").text
    assert len(full) > 3
    stop = full[2:4]
    r = client.chat.completions.create(model="tiny", messages=api_messages("say something ."), max_tokens=N,
                                       temperature=0, stop=[stop])
    assert r.choices[0].message.content == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"


def test_sixteen_staggered_clients_share_steps_and_answer_as_if_alone(server, client, reference, monkeypatch):
    _, scheduler, _ = server
    slow_steps(monkeypatch, scheduler, 0.005)
    colours = [(40 + 13 * i, 250 - 11 * i, (97 * i) % 256) for i in range(16)]
    asks = [(f"question {i} : what is {'shown' if i % 2 else 'here'} ?" + " more" * (i % 5),
             solid(colours[i]) if i % 3 else None) for i in range(16)]
    wants = [alone(reference, text, image, n=M) for text, image in asks]
    routes = {json.dumps(routing_report(reference.model.awaker_config, w.routing)["groups"][0]["counts"]) for w in wants}
    assert len(routes) > 1, "the test needs requests with different routes"
    steps0 = scheduler.metrics["decode_steps_total"]
    rows0 = scheduler.metrics["batch_rows_total"]

    def ask(i):
        time.sleep(0.01 * i)  # staggered: later ones arrive while earlier ones decode
        text, image = asks[i]
        if i % 2:
            r = client.chat.completions.create(model="tiny", messages=api_messages(text, image), max_tokens=M,
                                               temperature=0)
            return r.choices[0].message.content, r.model_extra["awaker"]["routing"]
        out, routing = [], None
        for c in client.chat.completions.create(model="tiny", messages=api_messages(text, image), max_tokens=M,
                                                temperature=0, stream=True):
            out.append(c.choices[0].delta.content or "")
            routing = (c.model_extra or {}).get("awaker", {}).get("routing") or routing
        return "".join(out), routing

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, range(16)))
    for (text, routing), want in zip(got, wants):
        assert text == want.text
        assert routing == routing_report(reference.model.awaker_config, want.routing)
    steps = scheduler.metrics["decode_steps_total"] - steps0
    rows = scheduler.metrics["batch_rows_total"] - rows0
    assert rows / steps > 1.5, f"requests were not batched: {rows} rows over {steps} steps"
    assert sum(len(w.tokens) for w in wants) > 8 * 16, "the answers must be long enough to overlap"
    metrics = dict(line.split() for line in httpx.get(server[0] + "/metrics").text.splitlines() if line[0] != "#")
    assert float(metrics["awaker_max_batch_occupancy"]) > 1 and float(metrics["awaker_queue_length"]) == 0
    print(f"mean occupancy {rows / steps:.2f}, max {metrics['awaker_max_batch_occupancy']}")


def burst(scheduler, asks):
    """Submit every (text, image, params) before the scheduler thread starts, so that all arrive at once;
    -> per ask: (answer text, routing) or ("error", message). Each job must get exactly one start (unless
    it failed before it started) and exactly one ending."""
    done = [threading.Event() for _ in asks]
    results: list = [None] * len(asks)
    events: list[list[str]] = [[] for _ in asks]

    def emit_for(i):
        def emit(kind, payload):
            events[i].append(kind)
            if kind == "done":
                results[i] = (payload.text, payload.routing)
            elif kind in ("error", "fail"):
                results[i] = ("error", payload)
            if kind in ("done", "error", "fail"):
                done[i].set()
        return emit

    for i, (text, image, params) in enumerate(asks):
        scheduler.submit(Job(engine_messages(text, image), params, [], emit_for(i)))
    scheduler.start()
    try:
        assert all(d.wait(120) for d in done)
    finally:
        scheduler.stop()
    for kinds in events:
        assert [k for k in kinds if k != "text"] in (["start", "done"], ["start", "fail"], ["error"], ["fail"]), kinds
    return results


@pytest.mark.parametrize("fam", ["qwen2_vl", *NEW_FAMILIES])
def test_a_burst_is_prefilled_together_and_answers_as_alone(fam, reference, random_moe, family_moes):
    """Requests that arrive together share one left-padded prefill: the same answers and routes as each
    alone (greedy and seeded sampling, with and without an image, prompts of different lengths; Qwen3-VL's
    DeepStack features at the image positions of each row)."""
    model = random_moe if fam == "qwen2_vl" else family_moes[fam]
    reference = reference if fam == "qwen2_vl" else load_engine(str(model), device="cpu")
    asks = [(f"question {i} : what is here ?" + " more" * (3 * i), solid((40 * i, 180, 90)) if i % 2 else None,
             SamplingParams(max_new_tokens=M, temperature=0.8, seed=i) if i == 3 else SamplingParams(max_new_tokens=M))
            for i in range(6)]
    wants = [reference.generate([engine_messages(t, im)], p)[0] for t, im, p in asks]
    scheduler = Scheduler(load_engine(str(model), device="cpu"), max_batch=8, max_context=512)
    got = burst(scheduler, asks)
    for (text, routing), want in zip(got, wants):
        assert text == want.text
        assert routing_report(reference.model.awaker_config, routing) == \
            routing_report(reference.model.awaker_config, want.routing)
    assert scheduler.metrics["prefills_total"] == 1 and scheduler.metrics["requests_total"] == 6


def test_a_bad_request_in_a_burst_fails_alone(reference, random_moe):
    """A prompt too long for the server's context in a burst: that request gets its error, the others
    (then prefilled one by one) their answers."""
    asks = [("hi", None, SamplingParams(max_new_tokens=4)), ("long " * 300, None, SamplingParams(max_new_tokens=4)),
            ("hello there", None, SamplingParams(max_new_tokens=4))]
    scheduler = Scheduler(load_engine(str(random_moe), device="cpu"), max_batch=4, max_context=256)
    got = burst(scheduler, asks)
    assert got[1][0] == "error" and "more than the server's context of 256 tokens" in got[1][1]
    for i in (0, 2):
        assert got[i][0] == alone(reference, asks[i][0], n=4).text
    assert scheduler.metrics["requests_failed"] == 1 and scheduler.metrics["prefills_total"] == 2


def test_a_burst_with_a_one_token_answer_and_a_failing_first_token(reference, random_moe, monkeypatch):
    """In one batched prefill: a request whose answer ends at its first token leaves its row at once, one
    whose first token cannot be chosen fails alone, and the others are answered as alone."""
    from awaker_cli.serve import scheduler as scheduler_module

    asks = [(f"question {i} : what is here ?" + " more" * i, None,
             SamplingParams(max_new_tokens=1 if i == 1 else N, temperature=0.7 if i == 2 else 0.0, seed=3))
            for i in range(4)]
    wants = [reference.generate([engine_messages(t, im)], p)[0] for t, im, p in asks]
    sample = scheduler_module.sample

    def sample_failing_once(logits, params, generator):  # request 2's first token (the only one sampled)
        if params.greedy:
            return sample(logits, params, generator)
        monkeypatch.setattr(scheduler_module, "sample", sample)
        raise RuntimeError("injected fault")

    monkeypatch.setattr(scheduler_module, "sample", sample_failing_once)
    scheduler = Scheduler(load_engine(str(random_moe), device="cpu"), max_batch=4, max_context=256)
    got = burst(scheduler, asks)
    assert got[2] == ("error", "generation failed: RuntimeError: injected fault")
    for i in (0, 1, 3):
        assert got[i][0] == wants[i].text
    assert len(wants[1].tokens) <= 1
    m = scheduler.metrics
    assert m["prefills_total"] == 1 and m["requests_total"] == 4 and m["requests_failed"] == 1
    assert scheduler.active == 0 and scheduler.rows == [None] * 4


def test_models_health_metrics(server):
    base = server[0]
    assert httpx.get(base + "/v1/models").status_code == 401
    models = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert models["data"][0]["id"] == "tiny"
    assert httpx.get(base + "/health").json()["status"] == "ok"


def post(base, body, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=30)


@pytest.mark.parametrize("body,key,status,says", [
    ({"messages": [{"role": "user", "content": "hi"}]}, None, 401, "API key"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "wrong", 401, "API key"),
    ({"messages": "hi"}, KEY, 400, "messages must be"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, KEY, 400, "n must be 1"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, KEY, 400, "unsupported parameter(s): logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, KEY, 400, "temperature must be >= 0"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, KEY, 400, "max_tokens must be at least 1"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
     KEY, 400, "messages[0].content[0]: not a readable image"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]},
     KEY, 400, "outside --allow-local-images"),
    ({"messages": [{"role": "user", "content": "word " * 600}]}, KEY, 400, "more than the server's context of 512"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 600}, KEY, 400,
     "and max_tokens is 600: together more than the server's context of 512"),
])
def test_errors_are_openai_bodies(server, body, key, status, says):
    r = post(server[0], {"model": "tiny", **body}, key)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error["message"] and error["type"]


def test_without_max_tokens_the_answer_ends_with_the_context(server):
    r = post(server[0], {"model": "tiny", "messages": [{"role": "user", "content": "go on ."}], "temperature": 0})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= 512
    if r.json()["choices"][0]["finish_reason"] == "length":
        assert usage["prompt_tokens"] + usage["completion_tokens"] == 512


def test_bad_json_body(server):
    r = httpx.post(server[0] + "/v1/chat/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_a_full_queue_is_a_503(reference):
    scheduler = Scheduler(reference, max_batch=1, max_context=256, max_queue=1)  # its thread is not started
    scheduler.submit(Job("waiting", SamplingParams(), [], lambda *a: None))
    with running(scheduler) as base:
        r = post(base, {"messages": [{"role": "user", "content": "hi"}]}, key=None)
    assert r.status_code == 503 and "queue is full" in r.json()["error"]["message"]
    assert scheduler.queued == 1


def test_a_failing_step_is_a_500_and_the_server_goes_on(reference, monkeypatch):
    scheduler = Scheduler(reference, max_batch=2, max_context=256)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    step = scheduler._step

    def broken():
        raise RuntimeError("injected fault")

    scheduler.start()
    try:
        with running(scheduler) as base:
            monkeypatch.setattr(scheduler, "_step", broken)
            r = post(base, body, key=None)
            assert r.status_code == 500 and "generation failed: RuntimeError: injected fault" in r.json()["error"]["message"]
            monkeypatch.setattr(scheduler, "_step", step)
            r = post(base, body, key=None)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == alone(reference, "hi", n=4).text
    finally:
        scheduler.stop()
    assert scheduler.active == 0 and scheduler.metrics["requests_failed"] == 1


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, monkeypatch):
    base, scheduler, _ = server
    # the 400-token answer (this prompt runs to max_tokens) takes 8 s or more: the client's disconnect must
    # be what ends it, even on a loaded machine
    slow_steps(monkeypatch, scheduler, 0.02)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "tell a long story ."}], "max_tokens": 400,
            "temperature": 0, "stream": True}
    cancelled = scheduler.metrics["requests_cancelled"]
    with httpx.stream("POST", base + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
                break
        assert scheduler.active == 1
    for _ in range(100):
        if scheduler.active == 0:
            break
        time.sleep(0.05)
    assert scheduler.active == 0 and scheduler.metrics["requests_cancelled"] == cancelled + 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_command_serves_and_stops_cleanly_on_a_signal(random_moe, sig):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "awaker_cli", "serve", str(random_moe), "--port", str(port),
                             "--device", "cpu", "--max-context", "256"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.1)
        r = post(base, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, key=None)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert "Traceback" not in err, err
    assert proc.returncode == 0, (proc.returncode, err)
    assert f"serving {random_moe} on http://127.0.0.1:{port}/v1" in err and err.rstrip().endswith("stopped")


@pytest.mark.parametrize("fam", NEW_FAMILIES)
def test_new_families_served_in_one_batch_answer_as_alone(fam, family_moes, monkeypatch):
    """Qwen2.5-VL and Qwen3-VL (DeepStack at prefill, q/k norm) through the server: staggered clients
    batched together get the answers and routes the engine gives each alone."""
    engine = load_engine(str(family_moes[fam]), device="cpu")
    asks = [(f"question {i} : what is here ?" + " more" * i, solid((30 * i, 200 - 20 * i, 90)) if i % 2 else None)
            for i in range(6)]
    wants = [alone(engine, text, image, n=M) for text, image in asks]
    scheduler = Scheduler(load_engine(str(family_moes[fam]), device="cpu"), max_batch=8, max_context=512, max_queue=16)
    slow_steps(monkeypatch, scheduler, 0.005)
    scheduler.start()
    try:
        with running(scheduler) as base:
            client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)

            def ask(i):
                time.sleep(0.01 * i)
                r = client.chat.completions.create(model="tiny", messages=api_messages(*asks[i]), max_tokens=M,
                                                   temperature=0)
                return r.choices[0].message.content, r.model_extra["awaker"]["routing"]

            with ThreadPoolExecutor(6) as pool:
                got = list(pool.map(ask, range(6)))
    finally:
        scheduler.stop()
    for (text, routing), want in zip(got, wants):
        assert text == want.text
        assert routing == routing_report(engine.model.awaker_config, want.routing)
    assert scheduler.metrics["batch_rows_total"] > scheduler.metrics["decode_steps_total"]  # really batched
