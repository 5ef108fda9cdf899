"""The generation engine: one prefill, then decode steps over a static KV cache, routed once per request.

A request's prompt goes once through the vision tower and the language model (prefill). The prefill
routes every sequence exactly as the model's own hook does (the routers' kernel on the mean
prompt-span input embedding) and fills the KV cache. Each later token is one decode step that reads
and writes only static buffers (token, position, cache slot, KV cache, routing), so on a GPU the step
is captured once as a CUDA graph and replayed; on the CPU the same step function runs eagerly.

The language model is driven layer by layer here instead of through transformers' forward: that
forward builds masks and cache objects per call (host syncs, fresh allocations), which is what makes
HF's static cache + torch.compile(reduce-overhead) fail (docs/design.md section 6). The layers' own modules
(norms, projections, MLP, adapters and their kernels) do all the math.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AwakerError
from .. import kernels
from ..model.build import model_span_tokens, route
from ..model.families import family_of_model
from ..model.layers import LoRALinear, MoELoRALinear
from ..model.routing import Routing, image_tokens, routing_spans
from .sampling import SamplingParams, draw_seed, sample

# A request: a user prompt, or chat messages [{"role": ..., "content": str | [parts]}] where a part is
# {"type": "text", "text": ...} or {"type": "image", "image": PIL image | path}.
Request = str | Sequence[dict]


@dataclass
class Generation:
    """The answer to one request."""

    text: str
    tokens: list[int]  # the new tokens, without the stop token
    prompt_tokens: int
    finish_reason: str  # "stop" (a stop token), "length" (max new tokens or the context), "interrupted"
    time_to_first_token_s: float  # from the request to its first token on the host (prefill included)
    decode_s: float  # from the first token to the last
    seed: int | None
    routing: Routing | None = None  # the routing this sequence was generated with ([1, R, k]); None: dense
    cached_prompt_tokens: int = 0  # prompt tokens whose KV cache the previous request left (not prefilled again)

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first over the time they took."""
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0

    def stats(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "cached_prompt_tokens": self.cached_prompt_tokens,
                "new_tokens": self.new_tokens,
                "time_to_first_token_s": round(self.time_to_first_token_s, 4), "decode_s": round(self.decode_s, 4),
                "tokens_per_s": round(self.tokens_per_s, 2)}


class _Buffers:
    """The static tensors of one (batch, length) shape; the captured decode step touches only these."""

    def __init__(self, engine: "Engine", batch: int, length: int):
        dev, dt = engine.device, engine.dtype
        shape = (batch, engine.num_kv_heads, length, engine.head_dim)
        self.batch, self.length = batch, length
        self.k = [torch.zeros(shape, device=dev, dtype=dt) for _ in engine.layers]
        self.v = [torch.zeros(shape, device=dev, dtype=dt) for _ in engine.layers]
        self.valid = torch.zeros(batch, length, device=dev, dtype=torch.bool)  # cache slots attended to
        self.tokens = torch.zeros(batch, device=dev, dtype=torch.long)  # the token the next step feeds
        self.pos = torch.zeros(batch, device=dev, dtype=torch.long)  # its rope position
        self.slot = torch.zeros(1, device=dev, dtype=torch.long)  # its cache slot (same for every row)
        self.logits = torch.zeros(batch, engine.vocab_size, device=dev, dtype=dt)
        self.routing = self.plans = None
        if engine.routed:
            cfg = engine.model.awaker_config
            rk = (batch, cfg.num_routers, cfg.top_k)
            self.num_slots = cfg.num_slots
            self.routing = Routing(torch.zeros(rk, device=dev, dtype=torch.long),
                                   torch.zeros(rk, device=dev), torch.zeros(rk, device=dev),
                                   torch.zeros(rk[:2], device=dev) if cfg.global_expert else None)
            # The layers ask the routing for its kernel plans (sequences grouped by expert) and cache
            # them on it: give the static routing a static plans tensor, refreshed per request.
            self.plans = torch.zeros(rk[1], batch, device=dev, dtype=torch.int32)
            self.routing._plans = self.plans
            self.routing.refresh_views(self.num_slots)  # static per-router tensors, refreshed per request
        self.graph = None

    def load_routing(self, routing: Routing):
        """Copy a request's routing into the static one the layers (and the captured graph) read."""
        self.routing.expert_ids.copy_(routing.expert_ids)
        self.routing.probs.copy_(routing.probs)
        self.routing.expert_weights.copy_(routing.expert_weights)
        if self.routing.global_weight is not None:
            self.routing.global_weight.copy_(routing.global_weight)
        self.routing.refresh_views(self.num_slots)  # the plans and the per-router tensors the layers read


@dataclass
class _Prefix:
    """What a batch-1 run left in its buffers, for the next request to continue from."""

    buf: _Buffers
    ids: list[int]  # the tokens whose K/V fill cache slots [0, len(ids)): prompt + generated tokens fed back
    span: list[int] | None  # the routing span [start, end) the routing was computed on (routed models)
    routing: Routing | None
    pixel_values: torch.Tensor | None  # the prompt's images: same tokens with other pixels are not a match
    image_grid_thw: torch.Tensor | None


@dataclass
class _Row:
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    end: float = 0.0


class _Run:
    """One batch of requests in flight: inputs, limits, and what the host has read back so far."""

    def __init__(self, engine: "Engine", inputs, params: SamplingParams, max_new: int, buffers: _Buffers,
                 t0: float):
        self.engine, self.inputs, self.params, self.max_new, self.buf = engine, inputs, params, max_new, buffers
        self.batch = inputs["input_ids"].shape[0]
        self.streaming = False  # a stream wants every token at once; a batch is read every few steps
        self.prompt_tokens = inputs["attention_mask"].sum(1).tolist()
        self.rows = [_Row() for _ in range(self.batch)]
        self.routing: Routing | None = None
        self.seed = draw_seed(params)
        self.t0 = t0  # the request arrived (before tokenizing and image processing)
        self.t_first: float | None = None
        self.read = 0  # new tokens per row the host has seen
        self.cached = 0  # prompt tokens taken from the previous run's KV cache (batch 1 only)

    @property
    def done(self) -> bool:
        return all(r.finish_reason for r in self.rows)

    def absorb(self, chunk: torch.Tensor):
        """New tokens [B, n] from the device; a row ends at its first stop token."""
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
        stops = self.engine.stop_ids
        for row, toks in zip(self.rows, chunk.tolist()):
            for t in toks:
                if row.finish_reason:
                    break
                if t in stops and not self.params.ignore_eos:
                    row.finish_reason, row.end = "stop", now
                else:
                    row.tokens.append(t)
        self.read += chunk.shape[1]
        if self.read >= self.max_new:
            for row in self.rows:
                if not row.finish_reason:
                    row.finish_reason, row.end = "length", now

    def result(self, i: int, interrupted: bool = False) -> Generation:
        row = self.rows[i]
        t_first = self.t_first or time.perf_counter()
        end = row.end if row.finish_reason else time.perf_counter()
        reason = row.finish_reason or ("interrupted" if interrupted else "length")
        text = self.engine.tokenizer.decode(row.tokens, skip_special_tokens=True)
        routing = None if self.routing is None else self.routing.select(torch.tensor([i]))
        return Generation(text, list(row.tokens), int(self.prompt_tokens[i]), reason, t_first - self.t0,
                          max(0.0, end - t_first), self.seed, routing, self.cached)


class TokenStream:
    """Text pieces of one request as they are generated; `.result` holds the Generation afterwards.

    Stop early with close() (e.g. on Ctrl-C): `.result` then holds what was generated so far."""

    def __init__(self, engine: "Engine", run: _Run):
        self._run = run
        run.streaming = True
        self._steps = engine._iterate(run)
        self.result: Generation | None = None

    def __iter__(self) -> Iterator[str]:
        detok = _Detokenizer(self._run.engine.tokenizer)
        row = self._run.rows[0]
        for _ in self._steps:
            piece = detok.feed(row.tokens)
            if piece:
                yield piece
        tail = detok.flush(row.tokens)
        if tail:
            yield tail
        self.result = self._run.result(0)

    def close(self):
        self._steps.close()
        if self.result is None:
            self.result = self._run.result(0, interrupted=True)


class _Detokenizer:
    """Incremental decoding: text is released once it no longer ends in an incomplete UTF-8 character,
    decoding only a window of recent tokens (byte-level BPE tokens are independent byte strings)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.start = self.mid = 0  # window [start, ...): text of [start, mid) was already released

    def _decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def feed(self, tokens: list[int]) -> str:
        if len(tokens) <= self.mid:
            return ""
        old = self._decode(tokens[self.start:self.mid])
        new = self._decode(tokens[self.start:])
        if len(new) <= len(old) or new.endswith("\ufffd"):
            return ""
        self.start, self.mid = self.mid, len(tokens)
        return new[len(old):]

    def flush(self, tokens: list[int]) -> str:
        old = self._decode(tokens[self.start:self.mid])
        new = self._decode(tokens[self.start:])
        self.start = self.mid = len(tokens)
        return new[len(old):]


class _Readback:
    """Copies generated tokens to the host without stalling the GPU: each copy is queued behind the
    step that produced it, and the host waits only for copies that are at least `lag` pushes old, so
    the next step is already queued while it waits."""

    def __init__(self, device: torch.device, lag: int):
        self.cuda = device.type == "cuda"
        self.lag = lag
        self.pending: list = []
        self.pushed = 0

    def push(self, out: torch.Tensor, upto: int):
        src = out[:, self.pushed:upto]
        self.pushed = upto
        if not self.cuda:
            self.pending.append((src.clone(), None))
            return
        host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        host.copy_(src, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((host, event))

    def ready(self, final: bool = False) -> Iterator[torch.Tensor]:
        keep = 0 if final else self.lag
        while len(self.pending) > keep:
            host, event = self.pending.pop(0)
            if event is not None:
                event.synchronize()
            yield host


class Engine:
    """Generation for one loaded model (awaker or dense Qwen2-VL) and its processor.

    Construction prepares the model for inference in place: q/k/v LoRA merged into the base weights
    (and q/k/v fused into one matmul), gradients off. Use `generate` for a batch, `stream` for one
    request's text pieces as they come.

    With reuse_prefix, a batch-1 request that starts with the tokens of the previous batch-1 run (a
    chat's next turn) prefills only its new tokens, on top of the KV cache that run left (see _reusable).
    """

    LENGTH_BUCKET = 128  # static cache lengths are rounded up to this, so graphs are reused across requests
    MAX_SHAPES = 2  # (batch, length) buffer sets (and graphs) kept alive

    def __init__(self, model, processor, *, use_graphs: bool | None = None, compile: bool = False,
                 min_pixels: int | None = None, max_pixels: int | None = None, reuse_prefix: bool = True):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # batches end at the same column: the next token's slot is shared
        self.family = family_of_model(model)
        if not self.family.engine:
            raise AwakerError(f"the generation engine does not run {self.family.label} yet "
                              f"({self.family.engine_note})")
        self.lm = self.family.language_model(model)
        self.layers = list(self.lm.layers)
        embed = self.lm.embed_tokens.weight
        self.device, self.dtype = embed.device, embed.dtype
        text = model.config.get_text_config()
        self.num_heads, self.num_kv_heads = text.num_attention_heads, text.num_key_value_heads
        # Qwen3-VL gives head_dim; the Qwen2 families compute it (as their attention modules do)
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        # The family's own functions: its rope application, and (Qwen3-VL) its q/k RMSNorm per head
        self.apply_rope = self.family.modeling().apply_rotary_pos_emb
        self.qk_norm = self.family.qk_norm
        self._deepstack = None  # (image-token mask, features per layer) of the prefill in progress
        self.context = text.max_position_embeddings
        self.vocab_size = model.lm_head.out_features
        self.routed = hasattr(model, "awaker_state")
        self.stop_ids = self._stop_ids()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.stop_ids)
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.graphs_off: str | None = None  # why a GPU engine decodes without CUDA graphs (said once)
        if self.use_graphs and (why := graph_blocker(model)) is not None:
            self._decode_eagerly(why)
        self.images_kwargs = self._image_size(min_pixels, max_pixels)
        self._buffers: OrderedDict[tuple[int, int], _Buffers] = OrderedDict()
        self.reuse_prefix = reuse_prefix
        self._prefix: _Prefix | None = None  # valid until the next run starts writing buffers
        self._merge_and_fuse()
        self._step = self._decode_step
        if compile:  # fuses the step's small elementwise kernels; the graph is still captured by us
            self._step = torch.compile(self._decode_step, dynamic=False)

    # ------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------

    def _stop_ids(self) -> set[int]:
        ids = set()
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self.tokenizer.unk_token_id:
            ids.add(im_end)
        if not ids:
            raise AwakerError("the model defines no end-of-sequence token (generation_config.json / tokenizer)")
        return ids

    def _image_size(self, min_pixels, max_pixels) -> dict:
        if min_pixels is None and max_pixels is None:
            return {}
        size = self.processor.image_processor.size
        get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
        lo = min_pixels if min_pixels is not None else get("shortest_edge")
        hi = max_pixels if max_pixels is not None else get("longest_edge")
        if lo is None or hi is None or lo < 1 or hi < lo:
            raise AwakerError(f"image pixel limits must satisfy 1 <= min_pixels <= max_pixels, got {lo} and {hi}")
        return {"size": {"shortest_edge": int(lo), "longest_edge": int(hi)}}

    @torch.no_grad()
    def _merge_and_fuse(self):
        """Fold q/k/v LoRA into the base (inference never needs them apart), then give each layer one
        fused q|k|v weight: one matmul per layer instead of three, which decode (bandwidth-bound,
        small k/v outputs) likes. The modules keep views into the fused tensor, so no memory is doubled."""
        for m in self.model.modules():
            # a quantized base cannot absorb the delta: that LoRA stays unmerged (same output)
            if isinstance(m, LoRALinear) and not m.merged and getattr(m, "base_layer", None) is None \
                    and m.weight.dtype.is_floating_point:
                m.merge_()
        self.qkv: list[tuple[torch.Tensor, torch.Tensor | None] | None] = []
        for layer in self.layers:
            mods = [getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj")]
            plain = all((type(m) is nn.Linear or (isinstance(m, LoRALinear) and m.merged))
                        and m.weight.dtype.is_floating_point for m in mods)
            biases = {m.bias is None for m in mods}
            # quantized or odd layers, or a q/k norm between projection and rope (the fused decode kernel
            # ropes straight from the projection): call the modules one by one
            if not plain or len(biases) != 1 or self.qk_norm:
                self.qkv.append(None)
                continue
            sizes = [m.out_features for m in mods]
            weight = torch.cat([m.weight for m in mods])
            bias = None if mods[0].bias is None else torch.cat([m.bias for m in mods])
            for m, w, b in zip(mods, weight.split(sizes), bias.split(sizes) if bias is not None else [None] * 3):
                m.weight = nn.Parameter(w, requires_grad=False)
                if b is not None:
                    m.bias = nn.Parameter(b, requires_grad=False)
            self.qkv.append((weight, bias))
        self.glu = [self._fuse_gate_up(layer.mlp) for layer in self.layers]
        norms = [m for layer in self.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
        # the fused residual add + RMSNorm computes Qwen2's RMSNorm: use it only for norms that are one
        self.fused_norms = all(hasattr(m, "variance_epsilon") and hasattr(m, "weight")
                               for m in norms + [self.lm.norm])

    @torch.no_grad()
    def _fuse_gate_up(self, mlp):
        """gate_proj and up_proj share their input (and, in awaker, their router): one base matmul for both
        (the weights concatenated, the modules keeping views), and for LoRA-MoE layers one shrink (the A's
        stacked along the rank) and an expand that writes silu(gate) * up (kernels.lora_glu). None when the
        layer does not have that form (quantized, biased, different routers...): the module runs as it is."""
        gate, up = getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)
        if gate is None or up is None or not hasattr(mlp, "down_proj") \
                or getattr(mlp, "act_fn", None).__class__.__name__ not in ("SiLU", "SiLUActivation"):
            return None
        if type(gate) is not type(up) or gate.bias is not None or up.bias is not None \
                or not (gate.weight.dtype.is_floating_point and up.weight.dtype.is_floating_point):
            return None
        if type(gate) is MoELoRALinear:
            same = (gate.router_index == up.router_index and gate.lora_A.shape == up.lora_A.shape
                    and gate.lora_B.shape == up.lora_B.shape and gate.scaling == up.scaling
                    and gate.base_layer is None and up.base_layer is None)
            if not same:
                return None
        elif type(gate) is not nn.Linear:
            return None
        weight = torch.cat([gate.weight, up.weight])
        gate.weight = nn.Parameter(weight[: gate.out_features], requires_grad=False)
        up.weight = nn.Parameter(weight[gate.out_features:], requires_grad=False)
        if type(gate) is not MoELoRALinear:
            return (weight, None)
        r = gate.rank
        lora_A = torch.cat([gate.lora_A, up.lora_A], dim=1)  # [slots, 2r, in]
        gate.lora_A = nn.Parameter(lora_A[:, :r], requires_grad=False)
        up.lora_A = nn.Parameter(lora_A[:, r:], requires_grad=False)
        return (weight, lora_A)

    # ------------------------------------------------------------------------------------------
    # requests -> model inputs
    # ------------------------------------------------------------------------------------------

    def encode(self, requests: Sequence[Request]):
        """Chat-templated, tokenized and image-processed inputs of a batch (left-padded, on the device)."""
        texts, images = [], []
        for request in requests:
            messages, imgs = _split_images(request)
            texts.append(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
            images += imgs
        kwargs = self.images_kwargs if images else {}
        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt", **kwargs)
        return inputs.to(self.device)

    def _start(self, requests: Sequence[Request], params: SamplingParams) -> _Run:
        t0 = time.perf_counter()
        params.validate()
        if not requests:
            raise AwakerError("nothing to generate: no requests")
        inputs = self.encode(requests)
        batch, length = inputs["input_ids"].shape
        if length >= self.context:
            raise AwakerError(f"the prompt is {length} tokens, longer than the model's context of {self.context} "
                              "tokens (shorten it, or use fewer or smaller images)")
        max_new = min(params.max_new_tokens, self.context - length)
        bucket = -(-(length + max_new) // self.LENGTH_BUCKET) * self.LENGTH_BUCKET
        return _Run(self, inputs, params, max_new, self._buffers_for(batch, bucket), t0)

    def _buffers_for(self, batch: int, length: int) -> _Buffers:
        key = (batch, length)
        if key in self._buffers:
            self._buffers.move_to_end(key)
            return self._buffers[key]
        while len(self._buffers) >= self.MAX_SHAPES:  # free the oldest shape (its cache and graph) first
            _, old = self._buffers.popitem(last=False)
            if self._prefix is not None and self._prefix.buf is old:
                self._prefix = None  # let its memory go
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self._buffers[key] = _Buffers(self, batch, length)
        return self._buffers[key]

    # ------------------------------------------------------------------------------------------
    # public API
    # ------------------------------------------------------------------------------------------

    def generate(self, requests: Sequence[Request], params: SamplingParams | None = None) -> list[Generation]:
        """Answer a batch of requests together (different routes share the batch)."""
        run = self._start(list(requests), params or SamplingParams())
        for _ in self._iterate(run):
            pass
        return [run.result(i) for i in range(run.batch)]

    def stream(self, request: Request, params: SamplingParams | None = None) -> TokenStream:
        """One request's answer as text pieces while it is generated."""
        return TokenStream(self, self._start([request], params or SamplingParams()))

    def warm_up(self, batch_sizes: Sequence[int] = (1,), *, quiet: bool = False) -> float:
        """Compile the kernels and capture the decode step before the first request, so that the first
        answer on a bare GPU is not late by the compile time: a long prompt (the prefill tiling) and a
        short one (the decode tiling, and the graph of the shortest cache bucket) for each batch size,
        two new tokens each. Says what it does on stderr (unless quiet); returns the seconds it took.
        The routing and cache it leaves are not reused by a later request."""
        from ..progress import stderr

        t = time.perf_counter()
        if not quiet:
            stderr.print("warming up: compiling the kernels and capturing the decode step ...", markup=False,
                         highlight=False)
        params = SamplingParams(max_new_tokens=2, ignore_eos=True)
        long = " ".join(["the quick brown fox jumps over the lazy dog ."] * 30)  # past the 256-row prefill tiling
        for batch in batch_sizes:
            for prompt in (long, "hello"):
                self.generate([prompt] * batch, params)
        self._prefix = None
        took = time.perf_counter() - t
        if not quiet:
            stderr.print(f"warmed up in {took:.1f} s", markup=False, highlight=False)
        return took

    @property
    def last_routing(self) -> Routing | None:
        """The routing of the last prefill (every sequence of its batch)."""
        return self.model.awaker_state.current if self.routed else None

    # ------------------------------------------------------------------------------------------
    # the generation loop
    # ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _iterate(self, run: _Run) -> Iterator[None]:
        """Prefill, then decode; yields whenever new tokens reached the host (run.rows)."""
        buf, params = run.buf, run.params
        state = self.model.awaker_state if self.routed else None
        pinned = state.fixed if state is not None else None
        if any(pinned is b.routing for b in self._buffers.values()):
            pinned = None  # left behind by a run that was abandoned unfinished, not pinned by the user
        # This run overwrites buffers: what the last run left holds only for the decision made here.
        prefix, self._prefix = self._prefix, None
        reuse = self._reusable(run, prefix, pinned)
        fed = 0  # generated tokens fed back through the model (their K/V are in the cache)
        prefilled = False
        # Tokens reach the host every step when streaming, else every few steps (to see finished rows);
        # on a GPU always one read-back late, so the next step is queued while the host waits.
        every = 1 if run.streaming else 4
        reader = _Readback(self.device, lag=1 if self.device.type == "cuda" else 0)
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=self.device).manual_seed(run.seed)
        stops = torch.tensor(sorted(self.stop_ids), device=self.device)
        try:
            if state is not None:
                state.fixed = buf.routing  # every adapter layer reads the static routing copy
            if self.use_graphs and buf.graph is None:
                self._capture_or_fall_back(buf)
            if reuse:
                logits = self._continue(run, prefix, reuse)
            else:
                logits = self._prefill(run, pinned)
            out = torch.full((run.batch, run.max_new), self.pad_id, device=self.device, dtype=torch.long)
            prefilled = True
            finished = torch.zeros(run.batch, device=self.device, dtype=torch.bool)
            for s in range(run.max_new):
                if s > 0:
                    if buf.graph is not None:
                        buf.graph.replay()
                    else:
                        self._step(buf)
                    fed = s
                    logits = buf.logits
                tok = sample(logits, params, generator)
                if not params.ignore_eos:
                    tok = tok.masked_fill(finished, self.pad_id)
                    finished |= torch.isin(tok, stops)
                out[:, s] = tok
                buf.tokens.copy_(tok)
                last = s == run.max_new - 1
                if s == 0 or last or (s + 1) % every == 0:  # the first token at once: time to first token
                    reader.push(out, s + 1)
                for chunk in reader.ready(final=last):
                    run.absorb(chunk)
                    yield
                    if run.done:
                        return
        finally:
            if state is not None:
                state.fixed = pinned
            if prefilled and run.batch == 1 and pinned is None and self.reuse_prefix:
                ids = run.inputs["input_ids"][0].tolist() + out[0, :fed].tolist()
                span = self._span(run.inputs) if self.routed else None
                self._prefix = _Prefix(buf, ids, span, run.routing, run.inputs.get("pixel_values"),
                                       run.inputs.get("image_grid_thw"))

    def _capture_or_fall_back(self, buf: _Buffers):
        try:
            self._capture(buf)
        except Exception as e:  # e.g. a layer that syncs the host: still correct, just slower
            buf.graph = None
            buf.valid.zero_()
            self._decode_eagerly(f"capturing the decode step failed ({type(e).__name__}: {e})")

    def _decode_eagerly(self, why: str):
        """Give up CUDA graphs for this engine, saying so once, with why (also kept in `graphs_off`)."""
        from ..progress import stderr

        self.use_graphs = False
        if self.graphs_off is None:
            self.graphs_off = why
            stderr.print(f"note: decoding without CUDA graphs (slower): {why}", markup=False, highlight=False)

    def _capture(self, buf: _Buffers):
        """Record the decode step of this buffer set as a CUDA graph (after warm-up runs that compile
        kernels and set up cuBLAS); the warm-ups write junk into the cache, which the prefill resets."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                buf.slot.zero_()
                buf.pos.zero_()
                self._step(buf)
        torch.cuda.current_stream().wait_stream(side)
        buf.slot.zero_()
        buf.pos.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(buf)
        buf.graph = graph
        buf.valid.zero_()

    def _prefill(self, run: _Run, pinned: Routing | None) -> torch.Tensor:
        """The whole prompt at once: vision tower, routing, KV cache of every prompt token; returns the
        logits of the last prompt position [B, V]."""
        inputs, buf = run.inputs, run.buf
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        batch, length = ids.shape
        embeds = self._embed(inputs)
        positions = self._positions(inputs)
        if self.routed:
            run.routing = pinned if pinned is not None else self._route(ids, mask, embeds)
            if run.routing.batch_size != batch:
                raise AwakerError(f"the pinned routing is for {run.routing.batch_size} sequences, the batch has {batch}")
            self.model.awaker_state.current = run.routing
            buf.load_routing(run.routing)
        buf.valid.zero_()
        buf.valid[:, :length] = mask.bool()
        causal = torch.ones(length, length, device=self.device, dtype=torch.bool).tril()
        # A padding row attends to itself only: keeps its (unused) values finite, so no NaN reaches the cache.
        allowed = (causal & buf.valid[:, None, :length]) | torch.eye(length, device=self.device, dtype=torch.bool)
        slots = torch.arange(length, device=self.device)
        deepstack, self._deepstack = self._deepstack, None
        logits = self._forward(embeds, positions, _additive(allowed[:, None], self.dtype), slots, length, buf,
                               deepstack=deepstack)
        buf.pos.copy_(positions.amax(dim=(0, 2)) + 1)
        buf.slot.fill_(length)
        return logits

    def _positions(self, inputs) -> torch.Tensor:
        """The model's (m)rope positions [3, B, T] of the whole inputs."""
        ids = inputs["input_ids"]
        mm_types = inputs.get("mm_token_type_ids")
        if mm_types is None:
            mm_types = (ids == self.model.config.image_token_id).int()
        positions, _ = self.model.model.get_rope_index(
            input_ids=ids, mm_token_type_ids=mm_types, image_grid_thw=inputs.get("image_grid_thw"),
            attention_mask=inputs["attention_mask"])
        return positions

    def _span(self, inputs) -> list[int]:
        """The routing span [start, end) of a batch-1 request, as route() finds it."""
        rule = self.model.awaker_config.routing_span
        return routing_spans(inputs["input_ids"], inputs["attention_mask"], model_span_tokens(self.model), rule)[0].tolist()

    def _reusable(self, run: _Run, prefix: _Prefix | None, pinned: Routing | None) -> int:
        """How many leading prompt tokens of `run` can keep the K/V that the previous run left (0: full
        prefill). Only when that is exactly the same computation: one sequence (no padding), a routing
        computed by the router (not pinned) on a span that lies wholly in the shared tokens, the same
        images there, and no image tokens among the new ones (they would need the vision tower). The
        previous run's buffers must still exist; a longer conversation in a bigger cache copies them."""
        if not self.reuse_prefix or prefix is None or run.batch != 1 or pinned is not None:
            return 0
        same = prefix.buf is run.buf
        if not same and not any(b is prefix.buf for b in self._buffers.values()):
            return 0  # its buffers were freed for another shape
        if same and self.use_graphs and run.buf.graph is None:  # a capture writes junk into the cache
            return 0
        inputs = run.inputs
        if inputs.get("pixel_values_videos") is not None or not bool(inputs["attention_mask"].all()):
            return 0
        ids = inputs["input_ids"][0].tolist()
        shared = 0
        for new, old in zip(ids, prefix.ids):
            if new != old:
                break
            shared += 1
        shared = min(shared, len(ids) - 1)  # the last prompt token goes through the model: its logits start the answer
        if shared <= 0 or bool(image_tokens(inputs["input_ids"][:, shared:], self.model.config).any()):
            return 0
        grid = inputs.get("image_grid_thw")
        if grid is not None:  # every image of the request lies in the shared tokens: it must be the cached one
            if prefix.image_grid_thw is None or len(prefix.image_grid_thw) < len(grid) \
                    or not torch.equal(prefix.image_grid_thw[:len(grid)], grid):
                return 0
            pixels = inputs["pixel_values"]
            if len(prefix.pixel_values) < len(pixels) or not torch.equal(prefix.pixel_values[:len(pixels)], pixels):
                return 0
        if self.routed:
            if prefix.routing is None or self.model.awaker_state.spans is not None:
                return 0
            span = self._span(inputs)
            if span != prefix.span or span[1] > shared:
                return 0
        return shared

    def _continue(self, run: _Run, prefix: _Prefix, shared: int) -> torch.Tensor:
        """The prefill of a batch-1 prompt whose first `shared` tokens are in the cache already: only the
        new tokens go through the model, into slots [shared, length); the buffers end as _prefill leaves
        them. Returns the logits of the last prompt position [1, V]."""
        inputs, buf = run.inputs, run.buf
        ids = inputs["input_ids"]
        length = ids.shape[1]
        # mrope positions depend on the images before: computed over the whole sequence, the new ones taken
        positions = self._positions(inputs)
        if prefix.buf is not buf:  # the conversation outgrew its cache bucket: carry the shared K/V over
            for i in range(len(self.layers)):
                buf.k[i][:, :, :shared].copy_(prefix.buf.k[i][:, :, :shared])
                buf.v[i][:, :, :shared].copy_(prefix.buf.v[i][:, :, :shared])
        if self.routed:  # the span is in the shared tokens: the router would give the cached routing again
            run.routing = prefix.routing
            self.model.awaker_state.current = run.routing
            buf.load_routing(run.routing)
        buf.valid.zero_()
        buf.valid[:, :length] = True
        # new token i (slot shared + i) sees every cached slot and the new tokens up to itself
        allowed = torch.ones(length - shared, length, device=self.device, dtype=torch.bool).tril(diagonal=shared)
        slots = torch.arange(shared, length, device=self.device)
        embeds = self.lm.embed_tokens(ids[:, shared:])
        logits = self._forward(embeds, positions[:, :, shared:], _additive(allowed[None, None], self.dtype), slots,
                               length, buf)
        buf.pos.copy_(positions.amax(dim=(0, 2)) + 1)
        buf.slot.fill_(length)
        run.cached = shared
        return logits

    def _embed(self, inputs) -> torch.Tensor:
        """Token embeddings with the image features put in place of the image pad tokens."""
        ids = inputs["input_ids"]
        embeds = self.lm.embed_tokens(ids)
        self._deepstack = None
        if inputs.get("pixel_values") is not None:
            out = self.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            features = torch.cat(list(out.pooler_output)).to(embeds.dtype)
            where = ids == self.model.config.image_token_id
            if int(where.sum()) != features.shape[0]:
                raise AwakerError(f"{int(where.sum())} image tokens but {features.shape[0]} image features")
            embeds = embeds.masked_scatter(where[..., None].expand_as(embeds), features)
            if self.family.deepstack:  # Qwen3-VL: vision features added after the first decoder layers
                # one tensor per layer (transformers 5.17) or one per image (newer releases)
                self._deepstack = (where, [f if torch.is_tensor(f) else torch.cat(list(f))
                                           for f in out.deepstack_features])
        return embeds

    def _route(self, ids, mask, embeds) -> Routing:
        """Every router on the mean prompt-span embedding, exactly as the model's prefill hook does."""
        return route(self.model, ids, mask, embeds)

    def _decode_step(self, buf: _Buffers):
        """One token for every row: reads buf.tokens/pos/slot, writes buf.logits and the cache, then
        advances pos and slot. Only device ops on static buffers: safe to capture as a CUDA graph."""
        x = self.lm.embed_tokens(buf.tokens)[:, None]
        positions = buf.pos.view(1, -1, 1).expand(3, -1, 1)
        buf.valid.index_fill_(1, buf.slot, True)
        mask = _additive(buf.valid[:, None, None], self.dtype)
        buf.logits.copy_(self._forward(x, positions, mask, buf.slot, buf.length, buf))
        buf.slot.add_(1)
        buf.pos.add_(1)

    def _forward(self, x, positions, mask, slots, kv_len, buf: _Buffers, deepstack=None) -> torch.Tensor:
        """The decoder layers over x [B, T, H] (T = prompt length or 1), writing K/V at `slots`;
        returns the logits of the last position [B, V]. Each residual add is fused with the RMSNorm
        that follows it (kernels.add_rmsnorm: the same ops as the modules on the torch path).
        deepstack: (image-token mask [B, T], features per layer), added to the first layers' outputs at
        the image tokens as Qwen3-VL's text model does (prefill only)."""
        cos, sin = self.lm.rotary_emb(x, positions)
        if not self.fused_norms:
            for i, layer in enumerate(self.layers):
                x = x + self._attention(i, layer.self_attn, layer.input_layernorm(x), cos, sin, mask, slots, kv_len,
                                        buf)
                x = x + self._mlp(i, layer.mlp, layer.post_attention_layernorm(x))
                if deepstack is not None and i < len(deepstack[1]):
                    x = self.lm._deepstack_process(x, deepstack[0], deepstack[1][i])
            return self.model.lm_head(self.lm.norm(x[:, -1:]))[:, 0]
        delta = None
        for i, layer in enumerate(self.layers):
            norm = layer.input_layernorm
            x, y = kernels.add_rmsnorm(x, delta, norm.weight, norm.variance_epsilon)
            delta = self._attention(i, layer.self_attn, y, cos, sin, mask, slots, kv_len, buf)
            norm = layer.post_attention_layernorm
            x, y = kernels.add_rmsnorm(x, delta, norm.weight, norm.variance_epsilon)
            delta = self._mlp(i, layer.mlp, y)
            if deepstack is not None and i < len(deepstack[1]):  # the layer's output is needed whole
                x, delta = self.lm._deepstack_process(x + delta, deepstack[0], deepstack[1][i]), None
        norm = self.lm.norm
        _, y = kernels.add_rmsnorm(x[:, -1:], None if delta is None else delta[:, -1:], norm.weight,
                                   norm.variance_epsilon)
        return self.model.lm_head(y)[:, 0]

    def _mlp(self, i, mlp, x) -> torch.Tensor:
        fused = self.glu[i]
        if fused is None:
            return mlp(x)
        weight, lora_A = fused
        base = F.linear(x, weight)
        if lora_A is None:  # a dense MLP: one matmul for gate and up
            gate, up = base.chunk(2, dim=-1)
            return mlp.down_proj(F.silu(gate) * up)
        g = mlp.gate_proj
        ids, weights, gw, plan = g.routing_state.routing_for(x.shape[0]).for_router(g.router_index, lora_A.shape[0])
        act = kernels.lora_glu(base, x, lora_A, g.lora_B, mlp.up_proj.lora_B, ids, weights, gw, g.scaling, plan=plan)
        return mlp.down_proj(act)

    def _attention(self, i, attn, x, cos, sin, mask, slots, kv_len, buf: _Buffers) -> torch.Tensor:
        batch, length, _ = x.shape
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        group = heads // kv_heads
        if self.qkv[i] is not None and length == 1:  # decode: rope and the cache write in one kernel
            q = kernels.rope_kv_write(F.linear(x, *self.qkv[i]), cos, sin, buf.k[i], buf.v[i], slots, heads,
                                      kv_heads)
            keys, values = buf.k[i][:, :, :kv_len], buf.v[i][:, :, :kv_len]
            out = F.scaled_dot_product_attention(q.reshape(batch, kv_heads, group, dim), keys, values, attn_mask=mask)
            return attn.o_proj(out.reshape(batch, 1, heads * dim))
        if self.qkv[i] is not None:
            q, k, v = F.linear(x, *self.qkv[i]).split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q = q.view(batch, length, heads, dim)
        k = k.view(batch, length, kv_heads, dim)
        if self.qk_norm:  # Qwen3-VL: RMSNorm over each head's q and k, before rope
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(batch, length, kv_heads, dim).transpose(1, 2)
        q, k = self.apply_rope(q, k, cos, sin)
        buf.k[i].index_copy_(2, slots, k)
        buf.v[i].index_copy_(2, slots, v)
        keys, values = buf.k[i][:, :, :kv_len], buf.v[i][:, :, :kv_len]
        if length == 1:
            # Decode: the `group` query heads of a KV head become `group` query rows against that one KV
            # head, so grouped-query attention reads the cache once instead of repeating it per head.
            out = F.scaled_dot_product_attention(q.reshape(batch, kv_heads, group, dim), keys, values, attn_mask=mask)
        else:
            keys = keys.repeat_interleave(group, dim=1)
            values = values.repeat_interleave(group, dim=1)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        out = out.reshape(batch, heads, length, dim).transpose(1, 2).reshape(batch, length, heads * dim)
        return attn.o_proj(out)


def graph_blocker(model) -> str | None:
    """Why the decode step of `model` cannot be captured as a CUDA graph, or None."""
    for name, module in model.named_modules():
        threshold = getattr(getattr(module, "state", None), "threshold", 0.0)
        if type(module).__name__ == "Linear8bitLt" and threshold > 0:
            return (f"{name} is a bitsandbytes int8 layer with outlier threshold {threshold:g}, which checks "
                    "for outliers on the host in every call; `awaker export --quantize int8` now writes "
                    "threshold 0, which keeps CUDA graphs")
    return None


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the additive float mask SDPA takes (0 where allowed, -inf elsewhere)."""
    return torch.zeros(allowed.shape, device=allowed.device, dtype=dtype).masked_fill_(~allowed, float("-inf"))


def _split_images(request: Request) -> tuple[list[dict], list]:
    """Chat-template messages (images as {"type": "image"} placeholders) and the images in order."""
    if isinstance(request, str):
        request = [{"role": "user", "content": request}]
    messages, images = [], []
    for message in request:
        content = message["content"]
        if isinstance(content, str):
            messages.append({"role": message["role"], "content": [{"type": "text", "text": content}]})
            continue
        parts = []
        for part in content:
            if part.get("type") == "image" or "image" in part:
                images.append(load_image(part["image"]))
                parts.append({"type": "image"})
            else:
                parts.append(part)
        messages.append({"role": message["role"], "content": parts})
    return messages, images


def load_image(image):
    """A PIL image (RGB) from a path or an image; unreadable input is an AwakerError."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image).expanduser()
    if not path.is_file():
        raise AwakerError(f"{image}: no such image file")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise AwakerError(f"{image}: not a readable image ({type(e).__name__}: {e})")
