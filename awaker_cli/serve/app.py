"""The OpenAI-compatible HTTP API over a Scheduler (FastAPI on uvicorn)."""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import secrets
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..errors import AwakerError
from ..generate.report import routing_report
from ..generate.sampling import SamplingParams
from .scheduler import Job, QueueFull, Scheduler

SUPPORTED = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
             "stream", "n", "stream_options", "user"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def create_app(scheduler: Scheduler, *, model_name: str, api_key: str | None = None,
               allow_local_images: str | None = None):
    app = FastAPI(title="awaker serve")
    local_root = Path(allow_local_images).resolve() if allow_local_images else None
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                e = ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                             "authentication_error")
                return JSONResponse(e.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "active": scheduler.active, "queued": scheduler.queued}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                             "owned_by": "awaker"}]}

    @app.get("/metrics")
    async def metrics():
        m = dict(scheduler.metrics)
        lines = []
        for name, value in m.items():
            kind = "gauge" if name.startswith("max_") else "counter"
            lines += [f"# TYPE awaker_{name} {kind}", f"awaker_{name} {value}"]
        mean = m["batch_rows_total"] / m["decode_steps_total"] if m["decode_steps_total"] else 0.0
        lines += ["# TYPE awaker_batch_occupancy gauge", f"awaker_batch_occupancy {scheduler.active}",
                  "# TYPE awaker_mean_batch_occupancy gauge", f"awaker_mean_batch_occupancy {mean:.4f}",
                  "# TYPE awaker_queue_length gauge", f"awaker_queue_length {scheduler.queued}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON")
        messages, params, stop, stream, fit = parse_body(body, scheduler, local_root)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(messages, params, stop, lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait,
                                                                                          (kind, payload)), fit=fit)
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise ApiError(503, str(e), "server_error")
        kind, payload = await events.get()
        if kind == "error":
            raise ApiError(400, payload)
        if kind in ("fail", "busy"):
            raise ApiError(500 if kind == "fail" else 503, payload, "server_error")
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        cfg = getattr(scheduler.engine.model, "awaker_config", None)

        def extension(j: Job) -> dict:
            routing = None if j.routing is None else routing_report(cfg, j.routing)
            return {"routing": routing, "seed": j.seed}

        def usage(j: Job) -> dict:
            return {"prompt_tokens": j.prompt_tokens, "completion_tokens": len(j.tokens),
                    "total_tokens": j.prompt_tokens + len(j.tokens),
                    "prompt_tokens_details": {"cached_tokens": 0}}  # the server never reuses a cache (yet)

        if not stream:
            text = []
            try:
                while True:
                    kind, payload = await events.get()
                    if kind == "text":
                        text.append(payload)
                    elif kind == "done":
                        break
                    else:
                        raise ApiError(500, payload, "server_error")
            except asyncio.CancelledError:
                job.cancelled = True
                raise
            return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                                 "finish_reason": _reason(payload.finish_reason)}],
                    "usage": usage(payload), "awaker": extension(payload)}

        def chunk(delta: dict, finish=None, **extra) -> str:
            c = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(c)}\n\n"

        async def sse():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, payload = await events.get()
                    if kind == "text":
                        yield chunk({"content": payload})
                    elif kind == "done":
                        yield chunk({}, _reason(payload.finish_reason), usage=usage(payload),
                                    awaker=extension(payload))
                        break
                    else:
                        yield f"data: {json.dumps(ApiError(500, payload, 'server_error').body())}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or the answer ended): its batch row is freed at the next step
                job.cancelled = True

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def _reason(reason: str) -> str:
    return {"stop": "stop", "length": "length"}.get(reason, "stop")


def parse_body(body, scheduler: Scheduler, local_root: Path | None):
    """A chat completion request -> (engine messages, SamplingParams, stop strings, stream, fit: no
    max_tokens given); ApiError(400) naming the problem otherwise."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - SUPPORTED)
    if unknown:
        raise ApiError(400, f"unsupported parameter(s): {', '.join(unknown)}", param=unknown[0])
    if body.get("n", 1) != 1:
        raise ApiError(400, f"n must be 1 (one answer per request), got {body.get('n')!r}", param="n")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    messages = [_message(m, i, local_root) for i, m in enumerate(raw)]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    fit = max_tokens is None  # no limit asked: as many tokens as the context leaves (as OpenAI does)
    if fit:
        max_tokens = scheduler.max_context
    temperature, top_p, seed = body.get("temperature", 1.0), body.get("top_p", 1.0), body.get("seed")
    for name, value, types in (("max_tokens", max_tokens, int), ("temperature", temperature, (int, float)),
                               ("top_p", top_p, (int, float)), ("seed", seed, (int, type(None)))):
        if not isinstance(value, types) or isinstance(value, bool):
            raise ApiError(400, f"{name} has the wrong type: {value!r}", param=name)
    temperature = 1.0 if temperature is None else temperature
    params = SamplingParams(max_new_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                            seed=seed)
    try:
        params.validate()
    except AwakerError as e:
        raise ApiError(400, str(e).replace("--max-new-tokens", "max_tokens").replace("--", "").replace("-", "_"))
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", param="stop")
    return messages, params, stop, bool(body.get("stream", False)), fit


def _message(m, i: int, local_root: Path | None) -> dict:
    if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
        raise ApiError(400, f"messages[{i}] must be an object with role system, user or assistant",
                       param=f"messages[{i}]")
    content = m.get("content")
    if isinstance(content, str):
        return {"role": m["role"], "content": content}
    if not isinstance(content, list):
        raise ApiError(400, f"messages[{i}].content must be a string or a list of parts", param=f"messages[{i}]")
    parts = []
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise ApiError(400, f"{where}: image_url needs a url", param=where)
            parts.append({"type": "image", "image": _image(url, where, local_root)})
        else:
            raise ApiError(400, f"{where}: a part is {{type: text, text}} or {{type: image_url, image_url: {{url}}}}",
                           param=where)
    return {"role": m["role"], "content": parts}


def _image(url: str, where: str, local_root: Path | None):
    from PIL import Image, UnidentifiedImageError

    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(400, f"{where}: only base64 data URLs are supported", param=where)
        try:
            raw = base64.b64decode(data, validate=True)
            with Image.open(io.BytesIO(raw)) as im:
                im.load()
                return im.convert("RGB")
        except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as e:
            raise ApiError(400, f"{where}: not a readable image ({type(e).__name__})", param=where)
    if url.startswith(("http://", "https://")):
        raise ApiError(400, f"{where}: the server does not fetch URLs; send the image as a base64 data URL",
                       param=where)
    path = url.removeprefix("file://")
    if local_root is None:
        raise ApiError(400, f"{where}: local image paths need the server to run with --allow-local-images DIR",
                       param=where)
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(local_root):
        raise ApiError(400, f"{where}: {path} is outside --allow-local-images {local_root}", param=where)
    from ..generate.engine import load_image

    try:
        return load_image(resolved)
    except AwakerError as e:
        raise ApiError(400, f"{where}: {e}", param=where)
