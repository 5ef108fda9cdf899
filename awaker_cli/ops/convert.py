"""Import the official Awaker2.5-VL release checkpoint into the awaker format, streaming.

The release ships one `pytorch_model.bin`: the whole state dict of its forked-peft PeftModel
(docs/design.md section 2). Every key carries the prefix `base_model.model.` over the hub layout:

- base tensors under their usual names (`model.layers.N.…`, `visual.…`, `lm_head.weight`; the
  adapted linears keep `.weight`/`.bias`; newer peft's `.base_layer.weight` is accepted too);
- q/k/v: `….lora_A.default.weight` [r, in] and `….lora_B.default.weight` [out, r];
- o/gate/up/down: `….lora_moe_A.{0..N-1,g}.weight` [r, in], `….lora_moe_B.{…}.weight` [out, r];
- o_proj and gate_proj: the router, `….w_gate.weight` [N, hidden], `….w_gate.bias` [N], `….ln.weight`.

It maps to: base tensors unchanged, `….lora_A`/`….lora_B` for q/k/v, the experts stacked per module
into `….lora_A` [N+1, r, in] / `….lora_B` [N+1, out, r] (global expert last) and the routers stacked
into `awaker_routers.{gate_weight,gate_bias,norm_weight}` at index `AwakerConfig.router_index`, with
the release's settings (combine `release`: p²·E + (1−p)·G, top-1, RMSNorm eps 1e-6, temperature 1).

Everything is checked from names and shapes before a byte is written; then tensors are read one at a
time (the .bin through mmap, a .safetensors copy through safe_open) into a ShardWriter, so memory holds
one output shard, the few pieces of the module being stacked, and the small router tensors.
"""
from __future__ import annotations

import dataclasses
import math
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import (Checkpoint, ShardWriter, atomic_output_dir, check_free_space, check_output_dir,
                          copy_processor_files, missing_processor_files, resolve_path, write_model_card)
from ..checkpoint.keys import ROUTER_PREFIX, is_adapter_key, lm_module_path, to_hub
from ..checkpoint.reader import INDEX_NAME, SINGLE_NAME, read_config, read_header
from ..errors import AwakerError
from ..model.config import CONFIG_NAME, AwakerConfig
from .upcycle import _span_token_ids

RELEASE_PREFIX = "base_model.model."
GLOBAL_SLOT = "g"
RELEASE_LORA_TARGETS = ("q_proj", "k_proj", "v_proj")
RELEASE_MOE_TARGETS = ("o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_ALPHA = 512.0
SHOW = 4  # how many offending keys an error lists

_MODULE = r"(model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj))"
_LORA = re.compile(rf"^{_MODULE}\.lora_([AB])\.default\.weight$")
_MOE = re.compile(rf"^{_MODULE}\.lora_moe_([AB])\.(\d+|{GLOBAL_SLOT})\.weight$")
_ROUTER = re.compile(rf"^{_MODULE}\.(w_gate\.weight|w_gate\.bias|ln\.weight)$")
_BASE_LAYER = re.compile(rf"^{_MODULE}\.base_layer\.(weight|bias)$")
# release router tensor -> the RouterBank tensor it becomes
_ROUTER_FIELDS = {"w_gate.weight": "gate_weight", "w_gate.bias": "gate_bias", "ln.weight": "norm_weight"}


# --------------------------------------------------------------------------------------------------
# The source file
# --------------------------------------------------------------------------------------------------
class ReleaseSource:
    """The release state dict, addressed by its stored keys, one tensor at a time.

    A .bin is opened with torch.load(weights_only=True, mmap=True): no pickled code runs, and a
    tensor's bytes are read from disk only when it is used. A .safetensors copy is read through its
    header and safe_open.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if self.path.is_dir():
            found = [self.path / n for n in ("pytorch_model.bin", "model.safetensors") if (self.path / n).is_file()]
            if not found:
                raise AwakerError(f"{self.path}: a directory without pytorch_model.bin or model.safetensors "
                                  "(give the release's .bin file)")
            self.path = found[0]
        if not self.path.is_file():
            raise AwakerError(f"{self.path}: no such file")
        self._state: dict[str, torch.Tensor] | None = None
        self._header = None
        self._open = None
        if zipfile.is_zipfile(self.path):
            self.format = "bin"
            self._load_bin()
        elif self.path.suffix == ".safetensors" or self._looks_like_safetensors():
            self.format = "safetensors"
            self._header = read_header(self.path)
            order = sorted(self._header, key=lambda k: self._header[k].offset)
            self.entries = {k: (self._header[k].shape, self._header[k].dtype) for k in order}
        else:
            raise AwakerError(f"{self.path}: neither a PyTorch checkpoint in torch.save's zip format nor a "
                              "safetensors file (legacy-format .bin files cannot be memory-mapped; "
                              "save the state dict as .safetensors)")

    def _looks_like_safetensors(self) -> bool:
        with open(self.path, "rb") as f:
            head = f.read(9)
        return len(head) == 9 and head[8:9] == b"{"

    def _load_bin(self):
        import pickle

        from safetensors import SafetensorError

        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            text = str(e)
            m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            why = f"it references {m.group(1)}" if m else next(
                (line.split("error:", 1)[1].strip() for line in text.splitlines() if "WeightsUnpickler error" in line),
                "it holds more than tensors")
            raise AwakerError(f"{self.path}: refused: loading it would run pickled code ({why}); awaker loads "
                              "weights only (tensors and plain containers)")
        except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile, SafetensorError) as e:
            # (torch.load reads a *.safetensors name as safetensors: a renamed pickle fails there)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AwakerError(f"{self.path}: cannot read as a PyTorch checkpoint ({first})")
        if not isinstance(state, dict) or not state:
            raise AwakerError(f"{self.path}: holds a {type(state).__name__}, not a state dict of tensors")
        bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise AwakerError(f"{self.path}: not a flat state dict of tensors (e.g. {bad[0]!r} holds "
                              f"{type(state[bad[0]]).__name__})")
        self._state = state
        self.entries = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}

    def get(self, key: str) -> torch.Tensor:
        if self._state is not None:
            t = self._state[key]
            # A view into a larger (shared) storage would be written with the whole storage, or be
            # refused by safetensors: give it its own copy. Plain mmap'd tensors stay zero-copy.
            if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
                t = t.contiguous().clone()
            return t
        if self._open is None:
            from safetensors import safe_open

            self._open = safe_open(str(self.path), framework="pt")
        return self._open.get_tensor(key)

    def close(self):
        self._state = None
        self._open = None


# --------------------------------------------------------------------------------------------------
# The base directory (--base): config.json, processor files and, when it has them, its weights
# --------------------------------------------------------------------------------------------------
@dataclass
class BaseDir:
    path: Path
    config: dict
    checkpoint: Checkpoint | None  # None when the directory has no safetensors weights

    @property
    def text_config(self) -> dict:
        return self.config.get("text_config") or self.config

    @property
    def num_layers(self) -> int:
        return int(self.text_config["num_hidden_layers"])

    @property
    def family(self):
        from ..model.families import family_of_config

        return family_of_config(self.config)

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", self.text_config.get("tie_word_embeddings", False)))


def open_base(base: str | Path | None) -> BaseDir:
    if not base:
        raise AwakerError("--base is required: the Qwen2-VL-7B-Instruct directory the release was trained from "
                          "(the release .bin has no config.json or tokenizer/processor files)")
    path = resolve_path(str(base))
    has_weights = (path / INDEX_NAME).is_file() or (path / SINGLE_NAME).is_file()
    if has_weights:
        ckpt = Checkpoint(path)
        if (path / CONFIG_NAME).exists() or any(is_adapter_key(k) for k in ckpt.tensors):
            raise AwakerError(f"{path}: an awaker model; --base must be the dense Qwen2-VL directory")
        config = ckpt.config
    else:
        ckpt = None
        config = read_config(path)
    missing = missing_processor_files(path)
    if missing:
        raise AwakerError(f"{path}: missing processor/tokenizer files: {', '.join(missing)} "
                          "(--base must be the full Qwen2-VL-7B-Instruct directory)")
    return BaseDir(path, config, ckpt)


def expected_base_shapes(base: BaseDir) -> dict[str, tuple[int, ...]]:
    """Every base tensor (hub name -> shape) the model needs: the --base checkpoint's when it has weights,
    else those of a Qwen2-VL built from its config.json on the meta device (no memory, no weights)."""
    if base.checkpoint is not None:
        return {k: tuple(i.shape) for k, i in base.checkpoint.tensors.items()}
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    try:
        config = AutoConfig.from_pretrained(base.path)
    except Exception as e:  # transformers raises many types for a config it cannot read
        raise AwakerError(f"{base.path / 'config.json'}: transformers cannot read it ({type(e).__name__}: {e})")
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration._from_config(config)
    shapes = {to_hub(k): tuple(v.shape) for k, v in model.state_dict().items()}
    if base.tied:
        shapes.pop("lm_head.weight", None)  # transformers neither saves nor needs a tied head
    return shapes


# --------------------------------------------------------------------------------------------------
# Plan: map every key, check names and shapes, decide the outputs
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """What one source tensor becomes."""

    kind: str  # "base" | "lora" | "moe" | "router" | "skip"
    name: str  # its canonical (release, prefix-less, hub-layout) name
    out: str = ""  # output key (base, lora), module path (moe) or RouterBank field (router)
    matrix: str = ""  # moe: "A" | "B"
    slot: int = 0  # moe: stacked slot (global expert last); router: router index


@dataclass
class ConvertPlan:
    source: ReleaseSource
    base: BaseDir
    config: AwakerConfig
    pieces: dict[str, Piece]  # source key -> piece, in source order
    outputs: dict[str, tuple[tuple[int, ...], torch.dtype]]  # output key -> (shape, dtype), writing order
    max_shard_size: int
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(math.prod(s) * d.itemsize for s, d in self.outputs.values())

    def summary(self) -> dict:
        def params(keys):
            return sum(math.prod(self.outputs[k][0]) for k in keys)

        adapters = [k for k in self.outputs if is_adapter_key(k)]
        base = [k for k in self.outputs if not is_adapter_key(k)]
        return {
            "source": str(self.source.path),
            "source_format": self.source.format,
            "source_tensors": len(self.pieces),
            "base": str(self.base.path),
            "base_tensors": len(base),
            "base_params": params(base),
            "adapter_tensors": len(adapters),
            "adapter_params": params(adapters),
            "experts": self.config.num_experts,
            "rank": self.config.rank,
            "alpha": self.config.alpha,
            "routers": self.config.num_routers,
            "dtypes": sorted({str(d).removeprefix("torch.") for _, d in self.outputs.values()}),
            "total_bytes": self.total_bytes,
            "shards": max(1, math.ceil(self.total_bytes / self.max_shard_size)),
            "notes": self.notes,
            "awaker_config": self.config.to_dict(),
        }


def _canonical(key: str) -> str | None:
    """Release key -> prefix-less hub-layout name (base_layer folded away), or None without the prefix."""
    if not key.startswith(RELEASE_PREFIX):
        return None
    name = to_hub(key[len(RELEASE_PREFIX):])
    m = _BASE_LAYER.match(name)
    return f"{m.group(1)}.{m.group(4)}" if m else name


def _slot_names(n: int) -> list[str]:
    return [*map(str, range(n)), GLOBAL_SLOT]


def _infer_sizes(canon: dict[str, str], entries) -> tuple[int, int]:
    """(N routed experts, rank r) from the names and shapes of the expert tensors."""
    slots, rank = set(), None
    for key, name in canon.items():
        m = _MOE.match(name)
        if m:
            if m.group(5) != GLOBAL_SLOT:
                slots.add(int(m.group(5)))
            if rank is None and m.group(4) == "A" and len(entries[key][0]) == 2:
                rank = entries[key][0][0]
    if not slots:
        raise AwakerError("no routed expert tensors (…lora_moe_A.0.weight) found: not an Awaker2.5-VL release "
                          "checkpoint")
    if rank is None:
        raise AwakerError("no lora_moe_A tensor of shape [r, in] found: cannot read the LoRA rank")
    return max(slots) + 1, int(rank)


def _expected(cfg: AwakerConfig, base_shapes: dict[str, tuple[int, ...]], hidden: int) -> dict[str, tuple[int, ...]]:
    """Canonical release name -> shape, for every tensor the release must hold."""
    expected = dict(base_shapes)
    r, n = cfg.rank, cfg.num_experts
    for layer in range(cfg.num_layers):
        for proj in (*cfg.lora_targets, *cfg.moe_targets):
            path = lm_module_path(layer, proj)
            shape = base_shapes.get(f"{path}.weight")
            if shape is None:
                continue  # not a module of this base: its adapter tensors are reported as unknown
            out_f, in_f = shape
            if proj in cfg.lora_targets:
                expected[f"{path}.lora_A.default.weight"] = (r, in_f)
                expected[f"{path}.lora_B.default.weight"] = (out_f, r)
                continue
            for s in _slot_names(n):
                expected[f"{path}.lora_moe_A.{s}.weight"] = (r, in_f)
                expected[f"{path}.lora_moe_B.{s}.weight"] = (out_f, r)
            if cfg.router_owners[proj] == proj:
                expected[f"{path}.w_gate.weight"] = (n, hidden)
                expected[f"{path}.w_gate.bias"] = (n,)
                expected[f"{path}.ln.weight"] = (hidden,)
    return expected


def _listing(items: list[str]) -> str:
    more = f", … ({len(items) - SHOW} more)" if len(items) > SHOW else ""
    return ", ".join(items[:SHOW]) + more


def plan_convert(src: str | Path, base_dir: str | Path | None, *, alpha: float = DEFAULT_ALPHA,
                 max_shard_size: int) -> ConvertPlan:
    """Check everything that can go wrong before a byte is written and list what would be written."""
    base = open_base(base_dir)
    source = ReleaseSource(src)
    entries = source.entries
    canon = {k: _canonical(k) for k in entries}
    if not any(c is not None for c in canon.values()):
        raise AwakerError(f"{source.path}: no key starts with {RELEASE_PREFIX!r}: not the state dict of the "
                          "Awaker2.5-VL release (a PeftModel)")
    num_experts, rank = _infer_sizes({k: c for k, c in canon.items() if c is not None}, entries)
    hidden = int(base.text_config["hidden_size"])
    cfg = AwakerConfig(
        num_experts=num_experts, rank=rank, alpha=float(alpha), lora_targets=list(RELEASE_LORA_TARGETS),
        moe_targets=list(RELEASE_MOE_TARGETS), top_k=1, global_expert=True, router_temperature=1.0,
        router_norm_eps=1e-6, combine="release", routing_span="prompt", num_layers=base.num_layers,
        base_model=str(base_dir),
    ).validate()

    base_shapes = expected_base_shapes(base)
    tied_head = base.tied and "lm_head.weight" not in base_shapes
    expected = _expected(cfg, base_shapes, hidden)

    # -- names and shapes ------------------------------------------------------------------------
    unknown, mismatched, seen = [], [], {}
    for key, name in canon.items():
        if name == "lm_head.weight" and tied_head:
            continue  # a tied head: the embedding is written, transformers re-ties it on load
        if name is None or name not in expected:
            unknown.append(key)
        elif name in seen:
            unknown.append(f"{key} (duplicate of {seen[name]})")
        else:
            seen[name] = key
            shape = tuple(entries[key][0])
            if shape != tuple(expected[name]):
                mismatched.append(f"{key} {list(shape)} (expected {list(expected[name])})")
    missing = [RELEASE_PREFIX + n for n in expected if n not in seen]
    if unknown or missing or mismatched:
        parts = []
        if unknown:
            parts.append(f"{len(unknown)} unknown key(s): {_listing(unknown)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
        raise AwakerError(f"{source.path} does not match the Awaker2.5-VL release layout for {base.path} "
                          f"({num_experts} experts, rank {rank}): " + "; ".join(parts))

    # -- what each tensor becomes, and the outputs in writing order ----------------------------------
    pieces: dict[str, Piece] = {}
    outputs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    slots = {s: i for i, s in enumerate(_slot_names(num_experts))}
    group_dtypes: dict[str, torch.dtype] = {}
    router_dtypes: dict[str, torch.dtype] = {}
    remaining: dict[str, int] = {}  # module -> expert pieces still to come (to place its output)
    for key, name in canon.items():
        shape, dtype = entries[key]
        if name == "lm_head.weight" and tied_head:
            pieces[key] = Piece("skip", name)
        elif m := _MOE.match(name):
            module = m.group(1)
            pieces[key] = Piece("moe", name, module, m.group(4), slots[m.group(5)])
            group_dtypes.setdefault(module, dtype)
            remaining[module] = remaining.get(module, 2 * len(slots)) - 1
            if remaining[module] == 0:  # the module's stacked tensors are written when its last piece arrives
                out_f, in_f = base_shapes[f"{module}.weight"]
                outputs[f"{module}.lora_A"] = ((len(slots), rank, in_f), group_dtypes[module])
                outputs[f"{module}.lora_B"] = ((len(slots), out_f, rank), group_dtypes[module])
        elif m := _LORA.match(name):
            out = f"{m.group(1)}.lora_{m.group(4)}"
            pieces[key] = Piece("lora", name, out)
            outputs[out] = (tuple(shape), dtype)
        elif m := _ROUTER.match(name):
            field_name = _ROUTER_FIELDS[m.group(4)]
            index = cfg.router_index(int(m.group(2)), m.group(3))
            pieces[key] = Piece("router", name, field_name, slot=index)
            router_dtypes.setdefault(field_name, dtype)
        else:
            pieces[key] = Piece("base", name, name)
            outputs[name] = (tuple(shape), dtype)
    R, N = cfg.num_routers, num_experts
    for field_name, shape in (("gate_weight", (R, N, hidden)), ("gate_bias", (R, N)), ("norm_weight", (R, hidden))):
        outputs[ROUTER_PREFIX + field_name] = (shape, router_dtypes[field_name])

    cfg = dataclasses.replace(cfg, span_token_ids=_span_token_ids(base))
    notes = []
    if base.checkpoint is None:
        notes.append("--base has no weights: base tensors checked against its config.json")
    if any(_BASE_LAYER.match(to_hub(k[len(RELEASE_PREFIX):])) for k in entries if k.startswith(RELEASE_PREFIX)):
        notes.append("base weights stored as …base_layer.weight were renamed to …weight")
    return ConvertPlan(source, base, cfg, pieces, outputs, max_shard_size, notes)


# --------------------------------------------------------------------------------------------------
# Write
# --------------------------------------------------------------------------------------------------
def run_convert(plan: ConvertPlan, out: str | Path, *, force: bool = False,
                progress: Callable[[int], None] | None = None) -> dict:
    """Write the converted model into `out` atomically; progress(1) is called per source tensor."""
    inputs = [plan.source.path, plan.base.path]
    check_output_dir(Path(out), force, inputs)
    check_free_space(Path(out).parent, plan.total_bytes, "the converted model")
    source, cfg = plan.source, plan.config
    routers: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[tuple[str, int], torch.Tensor]] = {}  # module -> its expert pieces so far
    per_module = 2 * cfg.num_slots
    with atomic_output_dir(out, force, inputs) as tmp:
        writer = ShardWriter(tmp, plan.max_shard_size)
        for key, piece in plan.pieces.items():
            if piece.kind == "skip":
                pass
            elif piece.kind in ("base", "lora"):
                writer.add(piece.out, source.get(key))
            elif piece.kind == "moe":
                group = pending.setdefault(piece.out, {})
                group[(piece.matrix, piece.slot)] = source.get(key)
                if len(group) == per_module:
                    for matrix in ("A", "B"):
                        name = f"{piece.out}.lora_{matrix}"
                        dtype = plan.outputs[name][1]
                        stacked = torch.stack([group[(matrix, s)].to(dtype) for s in range(cfg.num_slots)])
                        writer.add(name, stacked)
                    del pending[piece.out]
            else:  # router
                name = ROUTER_PREFIX + piece.out
                if name not in routers:
                    shape, dtype = plan.outputs[name]
                    routers[name] = torch.zeros(shape, dtype=dtype)
                routers[name][piece.slot] = source.get(key).to(routers[name].dtype)
            if progress:
                progress(1)
        assert not pending, f"incomplete expert groups: {sorted(pending)}"  # the plan checked every key
        for name in (ROUTER_PREFIX + "gate_weight", ROUTER_PREFIX + "gate_bias", ROUTER_PREFIX + "norm_weight"):
            writer.add(name, routers.pop(name))
        shards = writer.close()
        source.close()
        shutil.copy2(plan.base.path / "config.json", tmp / "config.json")
        cfg.save(tmp)
        copied = copy_processor_files(plan.base.path, tmp)
        write_model_card(tmp, "Awaker2.5-VL (converted from the official release)", [
            f"Made by `awaker convert` from `{source.path.name}` with base `{cfg.base_model}`.",
            f"{cfg.num_experts} routed LoRA experts + 1 global expert of rank {cfg.rank} (alpha {cfg.alpha:g}) on "
            f"{', '.join(cfg.moe_targets)}; plain LoRA on {', '.join(cfg.lora_targets)}.",
            f"Routers: {cfg.num_routers} ({', '.join(cfg.router_names)} per layer; up/down reuse gate_proj's), "
            f"RMSNorm eps {cfg.router_norm_eps:g}, temperature {cfg.router_temperature:g}, top-{cfg.top_k}, "
            "routed once per sequence from the mean of its prompt-span input embeddings.",
            "Combine `release`: y = Wx + p²·E + (1 − p)·G, as the release computes it.",
        ], source=plan.base.path, base_model=cfg.base_model)
    summary = plan.summary()
    summary.update(output=str(Path(out)), shards=len(shards), files=sorted([*shards, *copied]))
    return summary
