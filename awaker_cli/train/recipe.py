"""Training recipes: a typed schema, YAML loading, `key=value` overrides and validation.

A recipe is plain YAML with four top-level fields and three sections:

    stage: 1 | 2 | 3
    model: dense Qwen2-VL directory (stage 1)
    init_from: the previous stage's output directory (stages 2 and 3)
    output_dir: where checkpoints, metrics.jsonl, recipe.yaml and the final model go
    adapter: {...}   LoRA / LoRA-MoE settings (see AdapterSection)
    data: {...}      training files and their processing (see DataSection)
    train: {...}     optimiser, schedule, precision, checkpoints (see TrainSection)

Everything is checked here, before any weights load: unknown keys are errors that name the field and
list the allowed ones, wrong types are errors that name the field and the expected type.
Relative paths are relative to the working directory (as in LLaMA-Factory), not to the recipe file.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import AwakerError
from ..model.config import COMBINE_MODES, LINEARS, SPAN_RULES

ALL_TARGETS = list(LINEARS)
STAGE1_TARGETS = ALL_TARGETS
DEFAULT_MOE_TARGETS = ["o_proj", "gate_proj", "up_proj", "down_proj"]


def _choices(*values) -> dict:
    return {"choices": values}


@dataclass
class AdapterSection:
    """LoRA / LoRA-MoE settings. A field left null is inherited (stages 2, 3: from `init_from`) or
    takes the stage's default. Stage 2 converts the stage-I LoRA: its rank and alpha carry over."""

    rank: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    # stage 1 only: the linears that get the plain LoRA (default: all seven)
    lora_targets: list[str] | None = None
    # stage 2: the linears that become LoRA-MoE (default o/gate/up/down); the rest stay plain LoRA
    moe_targets: list[str] | None = None
    num_experts: int | None = None
    top_k: int | None = None
    global_expert: bool | None = None
    combine: str | None = field(default=None, metadata=_choices(*COMBINE_MODES))
    router_noise_std: float | None = None
    router_temperature: float | None = None
    routing_span: str | None = field(default=None, metadata=_choices(*SPAN_RULES))


@dataclass
class DataSection:
    # JSON (an array of records) or JSONL files, Hugging Face datasets (a save_to_disk folder, .parquet,
    # .arrow); the layout of each record is detected
    train: list[str] = field(default_factory=list)
    format: str = field(default="auto", metadata=_choices("auto", "messages", "conversations", "alpaca"))
    # an eval split: files in the same formats as train, or val_size records held out of train (a
    # fraction < 1 or a count, the same records on every run of the recipe); evaluated every train.eval_steps
    val: list[str] = field(default_factory=list)
    val_size: float = 0.0
    # LLaMA-Factory's registry: entries of dataset_dir/dataset_info.json (comma-separated names)
    dataset: list[str] = field(default_factory=list)
    dataset_dir: str = "data"
    # image paths are relative to this directory if set, else to each data file's directory (registry
    # datasets: to dataset_dir)
    image_root: str | None = None
    min_pixels: int | None = None  # null: the processor's own
    max_pixels: int | None = None
    cutoff_len: int = 2048
    skip_bad_records: bool = False
    shuffle: bool = True
    num_workers: int = 0


@dataclass
class TrainSection:
    seed: int = 42
    epochs: int = 1
    max_steps: int = 0  # > 0: stop after this many optimizer steps (the schedule spans them)
    batch_size: int = 1  # per process, per micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.0
    scheduler: str = field(default="cosine", metadata=_choices("cosine", "linear", "constant"))
    warmup_ratio: float = 0.03
    warmup_steps: int = 0  # > 0 overrides warmup_ratio
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0: no clipping
    precision: str = field(default="bf16", metadata=_choices("bf16", "fp32"))
    gradient_checkpointing: bool = True
    balance_loss_coef: float = 0.0
    save_steps: int = 500  # 0: no intermediate checkpoints
    save_total_limit: int = 2  # newest checkpoints kept while training
    keep_checkpoints: bool = False  # keep checkpoints/ after the final model is written
    logging_steps: int = 10
    # with an eval split (data.val / data.val_size): evaluate every eval_steps optimizer steps (0: only at
    # the end); stop after early_stopping_patience evaluations without improvement (0: never). With an eval
    # split the final model holds the weights of the best evaluation.
    eval_steps: int = 0
    early_stopping_patience: int = 0
    report_to: str = field(default="none", metadata=_choices("none", "tensorboard", "wandb"))
    save_dtype: str = field(default="auto", metadata=_choices("auto", "float32", "bfloat16", "float16"))
    device: str = field(default="auto", metadata=_choices("auto", "cpu", "cuda"))
    # Under torchrun: ddp keeps a full copy of everything per process; fsdp shards base, adapters,
    # gradients and optimizer states over the processes (the 7B stage-2 state does not fit one GPU twice).
    parallel: str = field(default="ddp", metadata=_choices("ddp", "fsdp"))
    progress: bool = True


@dataclass
class Recipe:
    stage: int = field(default=1, metadata=_choices(1, 2, 3))
    model: str | None = None
    init_from: str | None = None
    output_dir: str | None = None
    adapter: AdapterSection = field(default_factory=AdapterSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, lists on one line."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


# Fields that may differ between the run that wrote a checkpoint and the run that resumes it.
RUN_CONTROL_FIELDS = {"train.save_steps", "train.save_total_limit", "train.keep_checkpoints", "train.logging_steps",
                      "train.progress", "data.num_workers", "train.device", "train.report_to"}


# -- schema machinery --------------------------------------------------------------------------------
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + " (or null)"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}s"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value, tp, where: str):
    """value (from YAML) -> tp, or an AwakerError naming the field."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise AwakerError(f"recipe: {where} must be a mapping of fields, got {value!r}")
        return _build(tp, value, where + ".")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single item where a list is expected
        if not isinstance(value, list):
            raise AwakerError(f"recipe: {where} must be {_type_name(tp)}, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    bad = AwakerError(f"recipe: {where} must be {_type_name(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise TypeError(f"unsupported recipe type {tp}")


def _build(cls, data: dict, prefix: str = ""):
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"in {prefix[:-1]}" if prefix else "at the top level"
        raise AwakerError(f"recipe: unknown field {prefix}{unknown[0]} (allowed {where}: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        where = prefix + name
        kwargs[name] = _coerce(value, hints[name], where)
        choices = fields[name].metadata.get("choices")
        if choices and kwargs[name] is not None and kwargs[name] not in choices:
            raise AwakerError(f"recipe: {where} must be one of {', '.join(map(str, choices))}, "
                              f"got {kwargs[name]!r}")
    return cls(**kwargs)


def _set_dotted(data: dict, key: str, value, cls=Recipe):
    parts = key.split(".")
    node, owner, prefix = data, cls, ""
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(owner)]
        if part not in names:
            where = f"in {prefix[:-1]}" if prefix else "at the top level"
            raise AwakerError(f"override {key}: unknown field {prefix}{part} (allowed {where}: {', '.join(names)})")
        tp = _hints(owner)[part]
        if i == len(parts) - 1:
            node[part] = value
            return
        if not dataclasses.is_dataclass(tp):
            raise AwakerError(f"override {key}: {prefix}{part} has no sub-fields")
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise AwakerError(f"recipe: {prefix}{part} must be a mapping of fields")
        node, owner, prefix = child, tp, prefix + part + "."


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise AwakerError(f"override {text!r}: write it as key=value (e.g. train.lr=2e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


# -- finding and loading -----------------------------------------------------------------------------
def recipe_dirs() -> list[Path]:
    """Where shipped recipes live: awaker_cli/recipes (in a checkout a link to the top-level recipes/,
    in a wheel a copy of it)."""
    import awaker_cli

    return [d for d in (Path(awaker_cli.__file__).parent / "recipes",) if d.is_dir()]


def shipped_recipes() -> list[str]:
    names = set()
    for d in recipe_dirs():
        names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def find_recipe(name: str) -> Path:
    """A path to a YAML file, or the name of a shipped recipe (stage1, tiny-stage2, ...)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if path.suffix in (".yaml", ".yml") or "/" in name:
        raise AwakerError(f"recipe {name}: no such file")
    for d in recipe_dirs():
        candidate = d / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    raise AwakerError(f"no recipe {name!r}: give a YAML file or one of {', '.join(shipped_recipes()) or '(none found)'}")


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise AwakerError(f"{path}: cannot read ({e.strerror})")
    except yaml.YAMLError as e:
        raise AwakerError(f"{path}: not valid YAML ({str(e).splitlines()[0]})")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise AwakerError(f"{path}: a recipe must be a mapping of fields")
    return data


def recipe_from_dict(data: dict) -> Recipe:
    return check(_build(Recipe, data))


def load_recipe(name: str, overrides: list[str] = ()) -> Recipe:
    """Find, read, override and validate a recipe (nothing heavy is loaded)."""
    data = read_yaml(find_recipe(name))
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    return recipe_from_dict(data)


def check(r: Recipe) -> Recipe:
    """Cross-field rules that need no file access (paths are checked when training starts)."""
    def bad(msg):
        raise AwakerError(f"recipe: {msg}")

    a, d, t = r.adapter, r.data, r.train
    if r.stage == 1:
        if r.init_from:
            bad("stage 1 starts from a dense base (`model`); init_from is for stages 2 and 3")
        for name in ("moe_targets", "num_experts", "top_k", "global_expert", "combine", "router_temperature"):
            if getattr(a, name) is not None:
                bad(f"adapter.{name} has no meaning in stage 1 (one plain LoRA, no experts)")
        if t.balance_loss_coef:
            bad("train.balance_loss_coef needs routers; stage 1 has none")
    else:
        if r.model:
            bad(f"stage {r.stage} starts from the previous stage's output: set init_from, not model")
        if r.stage == 2 and a.lora_targets is not None:
            bad("adapter.lora_targets is fixed by the stage-1 model in stage 2 (set adapter.moe_targets)")
        if r.stage == 3:
            if t.balance_loss_coef:
                bad("train.balance_loss_coef must be 0 in stage 3: the gates are frozen")
    for name in ("lora_targets", "moe_targets"):
        for target in getattr(a, name) or []:
            if target not in ALL_TARGETS:
                bad(f"adapter.{name}: unknown module {target!r} (choose from {', '.join(ALL_TARGETS)})")
    positive = {"train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum, "train.epochs": t.epochs,
                "data.cutoff_len": d.cutoff_len, "train.logging_steps": t.logging_steps,
                "train.save_total_limit": t.save_total_limit}
    for name, value in positive.items():
        if value < 1:
            bad(f"{name} must be at least 1, got {value}")
    nonneg = {"train.max_steps": t.max_steps, "train.save_steps": t.save_steps, "train.warmup_steps": t.warmup_steps,
              "data.num_workers": d.num_workers, "train.weight_decay": t.weight_decay,
              "train.max_grad_norm": t.max_grad_norm, "train.balance_loss_coef": t.balance_loss_coef,
              "train.eval_steps": t.eval_steps, "train.early_stopping_patience": t.early_stopping_patience,
              "data.val_size": d.val_size}
    for name, value in nonneg.items():
        if value < 0:
            bad(f"{name} must be >= 0, got {value}")
    if t.lr <= 0:
        bad(f"train.lr must be positive, got {t.lr}")
    if not 0 <= t.warmup_ratio < 1:
        bad(f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if not 0 <= t.min_lr_ratio <= 1:
        bad(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    for name in ("min_pixels", "max_pixels"):
        v = getattr(d, name)
        if v is not None and v < 1:
            bad(f"data.{name} must be positive, got {v}")
    if d.min_pixels and d.max_pixels and d.min_pixels > d.max_pixels:
        bad(f"data.min_pixels ({d.min_pixels}) is larger than data.max_pixels ({d.max_pixels})")
    if d.val and d.val_size:
        bad("data.val and data.val_size both set: give eval files or a held-out share of data.train, not both")
    if d.val_size >= 1 and not float(d.val_size).is_integer():
        bad(f"data.val_size must be a fraction below 1 or a whole number of records, got {d.val_size}")
    has_val = bool(d.val or d.val_size)
    for name in ("eval_steps", "early_stopping_patience"):
        if getattr(t, name) and not has_val:
            bad(f"train.{name} needs an eval split: set data.val=FILE or data.val_size (e.g. 0.1)")
    if t.early_stopping_patience and not t.eval_steps:
        bad("train.early_stopping_patience counts evaluations: set train.eval_steps too")
    if a.dropout is not None and not 0 <= a.dropout < 1:
        bad(f"adapter.dropout must be in [0, 1), got {a.dropout}")
    return r


def require_paths(r: Recipe):
    """The fields a run needs that --print-config does not (checked before anything loads)."""
    if not r.output_dir:
        raise AwakerError("recipe: output_dir is not set (add output_dir=PATH)")
    if r.stage == 1 and not r.model:
        raise AwakerError("recipe: stage 1 needs `model`, a dense Qwen2-VL directory (add model=PATH)")
    if r.stage > 1 and not r.init_from:
        raise AwakerError(f"recipe: stage {r.stage} needs init_from, the stage-{r.stage - 1} output directory "
                          "(add init_from=PATH)")
    if not r.data.train and not r.data.dataset:
        raise AwakerError("recipe: no training data: add data.train=PATH, or data.dataset=NAME with "
                          "data.dataset_dir=DIR (LLaMA-Factory's dataset_info.json)")
    for name in ("train", "val"):
        for f in getattr(r.data, name):
            if not Path(f).exists():
                raise AwakerError(f"recipe: data.{name}: {f}: no such file")


def diff_fields(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two recipe dicts."""
    out = []
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(prefix + key)
    return out
