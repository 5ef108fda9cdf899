"""Continuous batching over an Engine: one thread owns the engine and runs one decode step at a time
for every request in flight; a request that arrives joins at the next step, a finished one leaves at once.

How a request joins without disturbing the others (docs/design.md section "Serving"): every row of the
shared cache writes its next token at the same column `slot` (as the engine's own batches do). The
requests that arrived since the last step are prefilled together, exactly as `Engine.generate` prefills
a batch (left-padded, each row's own routing, a cache of their own; one at a time if the batch cannot
be taken whole), and each one's K/V are copied into a free row so that its prompt ends just before
`slot`; its positions are its own, so where its K/V sit in the row does not change the attention.
When the columns run out the live part of the cache is shifted left (or right, for a prompt longer
than `slot`); a cache of twice the largest context always leaves room (see _make_room).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..errors import AwakerError
from ..generate.engine import Engine, Request, _Buffers, _Detokenizer
from ..generate.sampling import SamplingParams, draw_seed, sample
from ..model.routing import Routing


class QueueFull(AwakerError):
    pass


@dataclass
class Job:
    """One request: what it asks, and what the scheduler hands back through `emit(kind, payload)`:
    ("start", None), ("text", piece), ("done", Job), ("error", message: the request's fault, a 400) or
    ("fail", message: the server's, a 500) or ("busy", message: shutting down, a 503)."""

    request: Request
    params: SamplingParams
    stop: list[str]
    emit: object  # callable(kind, payload), called from the scheduler thread
    cancelled: bool = False
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` emitted
    prompt_tokens: int = 0
    finish_reason: str | None = None
    routing: Routing | None = None
    seed: int | None = None
    max_new: int = 0
    t0: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    generator: torch.Generator | None = None
    detok: _Detokenizer | None = None
    start: int = 0  # the first cache column of its row
    fit: bool = False  # no max_tokens asked: stop where the context ends instead of refusing


class Scheduler:
    def __init__(self, engine: Engine, *, max_batch: int = 16, max_context: int | None = None, max_queue: int = 64):
        if max_context is None:
            max_context = min(4096, engine.context)
        if max_context > engine.context:
            raise AwakerError(f"--max-context {max_context} is more than the model's context of {engine.context} tokens")
        self.engine, self.max_batch, self.max_context, self.max_queue = engine, max_batch, max_context, max_queue
        engine.reuse_prefix = False  # rows are shared: a request never continues the previous one's cache
        length = -(-2 * max_context // engine.LENGTH_BUCKET) * engine.LENGTH_BUCKET
        self.buf = _Buffers(engine, max_batch, length)
        self.rows: list[Job | None] = [None] * max_batch
        self.waiting: deque[Job] = deque()
        self.lock = threading.Condition()
        self.stopping = False
        self.stops = engine.stop_ids
        self.metrics = {"requests_total": 0, "requests_failed": 0, "requests_cancelled": 0,
                        "prompt_tokens_total": 0, "completion_tokens_total": 0, "prefills_total": 0, "decode_steps_total": 0,
                        "batch_rows_total": 0, "max_batch_occupancy": 0}
        self.thread = threading.Thread(target=self._loop, name="awaker-scheduler", daemon=True)

    # ---- called from the server's threads ------------------------------------------------------

    def start(self):
        self.thread.start()

    def submit(self, job: Job):
        with self.lock:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests); retry later")
            self.waiting.append(job)
            self.lock.notify()

    def stop(self):
        with self.lock:
            self.stopping = True
            self.lock.notify()
        self.thread.join(timeout=30)

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    # ---- the scheduler thread ------------------------------------------------------------------

    def _loop(self):
        torch.set_grad_enabled(False)
        while True:
            with self.lock:
                while not self.stopping and not self.waiting and not self.active:
                    self.lock.wait()
                if self.stopping:
                    break
                joining = []
                while self.waiting and len(joining) < self.rows.count(None):
                    joining.append(self.waiting.popleft())
            try:
                with torch.inference_mode():
                    if joining:
                        self._admit(joining)
                    self._drop_cancelled()
                    if self.active:
                        self._step()
            except Exception as e:  # e.g. out of memory in a step: fail what is in flight, keep serving
                for job in [r for r in self.rows if r is not None]:
                    self._fail(job, e)
        for job in [*self.waiting, *[r for r in self.rows if r is not None]]:
            self._finish(job, "interrupted") if job.t_first else job.emit("busy", "the server is shutting down")

    def _admit(self, jobs: list[Job]):
        """Prefill the jobs that arrived since the last step and move each into a free row: all together
        in one left-padded prefill (as Engine.generate prefills a batch), or one at a time when the batch
        cannot be taken whole (a prompt too long, an image the processor refuses...), so that an error is
        only ever its own request's."""
        live = []
        for job in jobs:
            if job.cancelled:
                self.metrics["requests_cancelled"] += 1
            else:
                live.append(job)
        if len(live) > 1:
            try:
                prefilled = self._prefill(live)
            except Exception:  # nothing is placed yet: each is retried alone below, failing on its own
                prefilled = None
            if prefilled is not None:
                return self._place(live, *prefilled)
        for job in live:
            try:
                prefilled = self._prefill([job])
            except AwakerError as e:  # a too long prompt, an image the processor refuses...: the request's fault
                self.metrics["requests_failed"] += 1
                job.emit("error", str(e))
            except Exception as e:  # the server's fault (e.g. out of memory): this request fails, the others go on
                self._fail(job, e)
            else:
                self._place([job], *prefilled)

    def _prefill(self, jobs: list[Job]):
        """One prefill of the jobs' prompts in a cache of their own -> (run, prompt lengths, last logits)."""
        engine = self.engine
        for job in jobs:
            job.params.validate()
        # the prefill's own cache needs room for the prompts only: the answers are decoded in self.buf
        run = engine._start([job.request for job in jobs], SamplingParams(max_new_tokens=1))
        lengths = run.inputs["attention_mask"].sum(1).tolist()
        for job, length in zip(jobs, lengths):
            room = self.max_context - length
            if room < 1 or (not job.fit and job.params.max_new_tokens > room):
                asked = "" if job.fit else f" and max_tokens is {job.params.max_new_tokens}"
                raise AwakerError(f"the prompt is {length} tokens{asked}: together more than the server's context "
                                  f"of {self.max_context} tokens (--max-context)")
        state = engine.model.awaker_state if engine.routed else None
        if state is not None:
            state.fixed = run.buf.routing
        try:
            logits = engine._prefill(run, None)
        finally:
            if state is not None:
                state.fixed = None
        self.metrics["prefills_total"] += 1
        return run, lengths, logits

    def _place(self, jobs: list[Job], run, lengths: list[int], logits: torch.Tensor):
        """Copy each prefilled prompt into a free row so that it ends just before `slot`, then choose
        each job's first token. A failure fails these jobs only (every job gets one answer or one error)."""
        try:
            placed = self._copy_rows(jobs, run, lengths)
        except Exception as e:  # e.g. out of memory while shifting the cache
            for job in jobs:
                self._fail(job, e)
            return
        for row, b in placed:
            job = jobs[b]
            try:
                job.emit("start", None)
                self._take(row, logits[b:b + 1])
            except Exception as e:  # e.g. sampling from logits that are not finite: this job only
                self._fail(job, e)

    def _fail(self, job: Job, e: Exception):
        self._free(job)
        self.metrics["requests_failed"] += 1
        job.emit("fail", f"generation failed: {type(e).__name__}: {e}")

    def _copy_rows(self, jobs: list[Job], run, lengths: list[int]) -> list[tuple[int, int]]:
        """Move the prefilled prompts into free rows of the shared cache -> (row, batch index) per job."""
        buf, small = self.buf, run.buf
        self._make_room(max(lengths))
        slot, padded = int(buf.slot), run.inputs["input_ids"].shape[1]
        placed = []
        for b, (job, length) in enumerate(zip(jobs, lengths)):
            row = self.rows.index(None)
            prompt = slice(padded - length, padded)  # left padding: prompt b fills the end of its row
            for i in range(len(self.engine.layers)):
                buf.k[i][row, :, slot - length:slot] = small.k[i][b, :, prompt]
                buf.v[i][row, :, slot - length:slot] = small.v[i][b, :, prompt]
            buf.valid[row] = False
            buf.valid[row, slot - length:slot] = small.valid[b, prompt]
            buf.pos[row] = small.pos[b]
            if run.routing is not None:
                for name in ("expert_ids", "probs", "expert_weights", "global_weight"):
                    if getattr(buf.routing, name) is not None:
                        getattr(buf.routing, name)[row] = getattr(run.routing, name)[b]
                job.routing = run.routing.select(torch.tensor([b], device=run.routing.probs.device))
            job.seed, job.max_new = draw_seed(job.params), min(job.params.max_new_tokens, self.max_context - length)
            job.prompt_tokens, job.start = length, slot - length
            if not job.params.greedy:
                job.generator = torch.Generator(device=self.engine.device).manual_seed(job.seed)
            job.detok = _Detokenizer(self.engine.tokenizer)
            self.rows[row] = job
            placed.append((row, b))
            self.metrics["requests_total"] += 1
            self.metrics["prompt_tokens_total"] += length
        if run.routing is not None:
            buf.routing.refresh_views(buf.num_slots)
        return placed

    def _make_room(self, length: int):
        """Shift the live columns so that a prompt of `length` tokens fits before `slot`, with room after
        it for every row's remaining tokens. After the left shift slot <= max_context (each row holds at
        most max_context tokens), so slot + any row's remaining tokens <= 2 * max_context columns."""
        buf = self.buf
        live = [r.start for r in self.rows if r is not None]
        slot = int(buf.slot)
        shift = -(min(live) if live else slot)  # left: the oldest live column to 0
        if slot + shift < length:
            shift = length - slot  # right, if needed, so that the prompt ends at the slot
        if shift == 0:
            return
        for tensors in (buf.k, buf.v):
            for t in tensors:
                t.copy_(torch.roll(t, shift, dims=2))
        buf.valid.copy_(torch.roll(buf.valid, shift, dims=1))
        slot += shift
        buf.valid[:, slot:] = False
        if shift > 0:
            buf.valid[:, :shift] = False
        buf.slot.fill_(slot)
        for r in self.rows:
            if r is not None:
                r.start += shift

    def _step(self):
        buf = self.buf
        if int(buf.slot) >= buf.length:  # cannot happen within the limits (see _make_room); kept safe
            self._make_room(0)
        state = self.engine.model.awaker_state if self.engine.routed else None
        if state is not None:
            state.fixed = buf.routing
        try:
            self.engine._step(buf)
        finally:
            if state is not None:
                state.fixed = None
        n = self.active
        self.metrics["decode_steps_total"] += 1
        self.metrics["batch_rows_total"] += n
        self.metrics["max_batch_occupancy"] = max(self.metrics["max_batch_occupancy"], n)
        greedy = buf.logits.argmax(-1)
        for row, job in enumerate(self.rows):
            if job is not None:
                self._take(row, buf.logits[row:row + 1], greedy[row:row + 1])

    def _take(self, row: int, logits: torch.Tensor, greedy: torch.Tensor | None = None):
        """Choose row's next token from its logits [1, V] (as the engine does for a batch of one)."""
        job = self.rows[row]
        tok = greedy if job.params.greedy and greedy is not None else sample(logits, job.params, job.generator)
        self.buf.tokens[row] = tok[0]
        t = int(tok[0])
        if job.t_first is None:
            job.t_first = time.perf_counter()
        if t in self.stops and not job.params.ignore_eos:
            return self._finish(job, "stop")
        job.tokens.append(t)
        self.metrics["completion_tokens_total"] += 1
        job.text += job.detok.feed(job.tokens)
        if self._stop_string(job):
            return self._finish(job, "stop", by_string=True)
        if len(job.tokens) >= job.max_new:
            return self._finish(job, "length")
        self._send(job, final=False)

    @staticmethod
    def _stop_string(job: Job) -> bool:
        for s in job.stop:
            at = job.text.find(s)
            if at >= 0:
                job.text = job.text[:at]
                return True
        return False

    def _send(self, job: Job, final: bool):
        """Emit new text, holding back a tail that could be the start of a stop string."""
        end = len(job.text)
        if not final:
            for s in job.stop:
                for k in range(min(len(s) - 1, len(job.text)), 0, -1):
                    if job.text.endswith(s[:k]):
                        end = min(end, len(job.text) - k)
                        break
        if end > job.sent:
            job.emit("text", job.text[job.sent:end])
            job.sent = end

    def _finish(self, job: Job, reason: str, by_string: bool = False):
        if not by_string:  # the last pieces the detokenizer held back (an unfinished character)
            job.text += job.detok.flush(job.tokens)
            self._stop_string(job)
        job.finish_reason = reason
        self._send(job, final=True)
        self._free(job)
        job.emit("done", job)

    def _free(self, job: Job):
        if job in self.rows:
            row = self.rows.index(job)
            self.rows[row] = None
            self.buf.valid[row] = False

    def _drop_cancelled(self):
        for job in self.rows:
            if job is not None and job.cancelled:
                self._free(job)
                self.metrics["requests_cancelled"] += 1
