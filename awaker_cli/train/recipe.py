"""Training recipes: a pydantic schema, YAML loading, `key=value` overrides and validation.

A recipe is plain YAML with four top-level fields and three sections:

    stage: 1 | 2 | 3
    model: dense Qwen2-VL directory (stage 1)
    init_from: the previous stage's output directory (stages 2 and 3)
    output_dir: where checkpoints, metrics.jsonl, recipe.yaml and the final model go
    adapter: {...}   LoRA / LoRA-MoE settings (see AdapterSection)
    data: {...}      training files and their processing (see DataSection)
    train: {...}     optimiser, schedule, precision, checkpoints (see TrainSection)

Everything is checked here, before any weights load: unknown keys are errors that name the field and
list the allowed ones, wrong types are errors that name the field and the expected type (pydantic's
errors, rewritten as one line by _message). `awaker train --recipe-schema` prints the JSON schema.
Relative paths are relative to the working directory (as in LLaMA-Factory), not to the recipe file.
"""
from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import AwakerError
from ..model.config import COMBINE_MODES, LINEARS, SPAN_RULES

ALL_TARGETS = list(LINEARS)
STAGE1_TARGETS = ALL_TARGETS
DEFAULT_MOE_TARGETS = ["o_proj", "gate_proj", "up_proj", "down_proj"]


def _listify(value):
    # a single item where a list is expected (data.train=a.jsonl)
    return [value] if isinstance(value, (str, int, float)) and not isinstance(value, bool) else value


Files = Annotated[list[str], BeforeValidator(_listify)]
Targets = Annotated[list[Literal[LINEARS]], BeforeValidator(_listify)]


class _Section(BaseModel):
    # lax pydantic (YAML 1.1 reads 1e-4 as a string: it becomes a number) but numbers may name files
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, use_attribute_docstrings=True)

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_only_as_booleans(cls, value, info):
        # lax pydantic reads `epochs: true` as 1 and `progress: 1` as true: slips in a recipe, not intent
        wants_bool = _unwrap(cls.model_fields[info.field_name].annotation) is bool
        if value is not None and isinstance(value, bool) != wants_bool:
            raise ValueError("a boolean where none belongs, or a non-boolean where one does")
        return value


class AdapterSection(_Section):
    """LoRA / LoRA-MoE settings. A field left null is inherited (stages 2, 3: from `init_from`) or
    takes the stage's default. Stage 2 converts the stage-I LoRA: its rank and alpha carry over."""

    rank: int | None = None
    """LoRA rank r (stage 1; later stages keep the stage-1 rank)"""
    alpha: float | None = None
    """LoRA alpha: the update is scaled by alpha / rank"""
    dropout: float | None = Field(None, ge=0, lt=1)
    """dropout on the LoRA / expert inputs while training"""
    lora_targets: Targets | None = None
    """stage 1 only: the linears that get the plain LoRA (default: all seven)"""
    moe_targets: Targets | None = None
    """stage 2: the linears that become LoRA-MoE (default o/gate/up/down); the rest stay plain LoRA"""
    num_experts: int | None = None
    """routed LoRA experts per MoE linear (stage 2)"""
    top_k: int | None = None
    """experts each sequence is routed to"""
    global_expert: bool | None = None
    """one always-on global expert beside the routed ones"""
    combine: Literal[COMBINE_MODES] | None = None
    """convex: p·expert + (1−p)·global (starts where stage 1 ended); release: p²·expert + (1−p)·global"""
    router_noise_std: float | None = None
    """noise added to the router logits while training"""
    router_temperature: float | None = None
    """softmax temperature of the router"""
    routing_span: Literal[SPAN_RULES] | None = None
    """the tokens the router reads: prompt, prompt-text (without image tokens) or all"""


class DataSection(_Section):
    """Training (and eval) data and its processing."""

    train: Files = []
    """JSON (an array of records) or JSONL files, Hugging Face datasets (a save_to_disk folder, .parquet,
    .arrow); the layout of each record is detected"""
    format: Literal["auto", "messages", "conversations", "alpaca"] = "auto"
    """the record layout (auto: detected per record)"""
    val: Files = []
    """eval files, in the same formats as train (evaluated every train.eval_steps)"""
    val_size: float = Field(0.0, ge=0)
    """records held out of train for eval instead of val: a fraction < 1 or a count (the same records on
    every run of the recipe)"""
    dataset: Files = []
    """LLaMA-Factory's registry: entries of dataset_dir/dataset_info.json (comma-separated names)"""
    dataset_dir: str = "data"
    """the folder holding dataset_info.json"""
    image_root: str | None = None
    """image paths are relative to this directory if set, else to each data file's directory (registry
    datasets: to dataset_dir)"""
    min_pixels: int | None = Field(None, gt=0)
    """the processor's smallest image size in pixels (null: the processor's own)"""
    max_pixels: int | None = Field(None, gt=0)
    """the processor's largest image size in pixels (null: the processor's own)"""
    cutoff_len: int = Field(2048, ge=1)
    """tokens per sample at most"""
    skip_bad_records: bool = False
    """skip (and count) records that cannot be read instead of stopping"""
    shuffle: bool = True
    """shuffle the records every epoch"""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes"""


class TrainSection(_Section):
    """Optimiser, schedule, precision, evaluation and checkpoints."""

    seed: int = 42
    """the run's random seed"""
    epochs: int = Field(1, ge=1)
    """passes over the training data (unless max_steps is set)"""
    max_steps: int = Field(0, ge=0)
    """> 0: stop after this many optimizer steps (the schedule spans them)"""
    batch_size: int = Field(1, ge=1)
    """samples per process, per micro-batch"""
    grad_accum: int = Field(1, ge=1)
    """micro-batches per optimizer step"""
    lr: float = Field(1e-4, gt=0)
    """peak learning rate"""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """the schedule ends at lr * min_lr_ratio"""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """the learning-rate curve after the warmup"""
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """share of the steps spent warming up"""
    warmup_steps: int = Field(0, ge=0)
    """> 0 overrides warmup_ratio"""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay"""
    adam_beta1: float = 0.9
    """AdamW beta1"""
    adam_beta2: float = 0.999
    """AdamW beta2"""
    adam_eps: float = 1e-8
    """AdamW epsilon"""
    max_grad_norm: float = Field(1.0, ge=0)
    """gradient clipping norm (0: no clipping)"""
    precision: Literal["bf16", "fp32"] = "bf16"
    """bf16: bf16 base and autocast, fp32 adapters"""
    gradient_checkpointing: bool = True
    """recompute activations in the backward pass: less memory, more compute"""
    balance_loss_coef: float = Field(0.0, ge=0)
    """weight of the routers' load-balancing loss (stage 2 only)"""
    save_steps: int = Field(500, ge=0)
    """optimizer steps between checkpoints (0: no intermediate checkpoints)"""
    save_total_limit: int = Field(2, ge=1)
    """newest checkpoints kept while training"""
    keep_checkpoints: bool = False
    """keep checkpoints/ after the final model is written"""
    logging_steps: int = Field(10, ge=1)
    """optimizer steps between log lines and metrics.jsonl records"""
    eval_steps: int = Field(0, ge=0)
    """with an eval split (data.val / data.val_size): evaluate every eval_steps optimizer steps (0: only at
    the end); the final model then holds the weights of the best evaluation"""
    early_stopping_patience: int = Field(0, ge=0)
    """stop after this many evaluations without improvement (0: never)"""
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    """also log the metrics to TensorBoard or Weights & Biases"""
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the saved model (auto: the base's)"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda if there is a GPU, else cpu"""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """under torchrun: ddp keeps a full copy of everything per process; fsdp shards base, adapters,
    gradients and optimizer states over the processes (the 7B stage-2 state does not fit one GPU twice)"""
    progress: bool = True
    """show a progress bar"""


class Recipe(_Section):
    """An awaker training recipe (`awaker train RECIPE`): one stage of the LoRA-MoE training."""

    stage: Literal[1, 2, 3] = 1
    """1: plain LoRA on a dense model; 2: LoRA-MoE from the stage-1 output; 3: routers frozen"""
    model: str | None = None
    """stage 1: the dense Qwen2-VL directory"""
    init_from: str | None = None
    """stages 2 and 3: the previous stage's output directory"""
    output_dir: str | None = None
    """where checkpoints, metrics.jsonl, recipe.yaml and the final model go"""
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)

    @field_validator("adapter", "data", "train", mode="before")
    @classmethod
    def _empty_section(cls, value):
        return {} if value is None else value  # `adapter:` with every field commented out

    @model_validator(mode="after")
    def _cross_field_rules(self):
        return check(self)

    def to_dict(self) -> dict:
        return self.model_dump()

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, lists on one line."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


# Fields that may differ between the run that wrote a checkpoint and the run that resumes it.
RUN_CONTROL_FIELDS = {"train.save_steps", "train.save_total_limit", "train.keep_checkpoints", "train.logging_steps",
                      "train.progress", "data.num_workers", "train.device", "train.report_to"}


def recipe_json_schema() -> dict:
    """The recipe's JSON schema, for editors (yaml-language-server) and other tools. It accepts what
    load_recipe accepts beyond the field types: an empty section (`adapter:`, null in YAML) and a single
    item where a list is expected (`train: a.jsonl`). Not a number where a string is expected (awaker
    reads `model: 7` as the directory "7"; an editor flags it)."""
    schema = Recipe.model_json_schema()
    for name in ("adapter", "data", "train"):
        ref = schema["properties"][name].get("$ref", "")
        if ref.startswith("#/$defs/"):
            schema["$defs"][ref.removeprefix("#/$defs/")]["type"] = ["object", "null"]
    for section in schema["$defs"].values():
        for prop in section.get("properties", {}).values():
            if prop.get("type") == "array" and "items" in prop:  # a list field: its array becomes an alternative
                prop["anyOf"] = [{"type": prop.pop("type"), "items": prop.pop("items")}]
            alternatives = prop.get("anyOf", [])
            singles = [alt["items"] for alt in alternatives if alt.get("type") == "array" and "items" in alt]
            if singles:
                prop["anyOf"] = alternatives + singles
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


# -- pydantic's errors as one line -------------------------------------------------------------------
def _unwrap(tp):
    """The type inside `X | None` and Annotated[X, ...]."""
    while typing.get_origin(tp) in (Annotated, typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _expected(tp) -> str:
    tp = _unwrap(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        text = "one of " + ", ".join(map(str, typing.get_args(tp)))
    elif origin is list:
        item = _unwrap(typing.get_args(tp)[0])
        text = "a list of strings" if item is str else f"a list, each {_expected(item)}"
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        text = "a mapping of fields"
    else:
        text = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))
    return text


def _bounds(field) -> str:
    b = {k: getattr(m, k) for m in field.metadata for k in ("ge", "gt", "le", "lt") if hasattr(m, k)}
    if "lt" in b or "le" in b:
        return f"in [{b['ge']}, {b['lt']})" if "lt" in b else f"in [{b['ge']}, {b['le']}]"
    if "gt" in b:
        return "positive"
    return f"at least {b['ge']}" if b["ge"] else ">= 0"


def _message(error: dict) -> str:
    """One of pydantic's errors as the line a user sees: the dotted field, what it must be, what it got."""
    loc, value = error["loc"], error["input"]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    owner, tp, field = Recipe, Recipe, None
    for i, part in enumerate(loc):
        tp = _unwrap(tp)
        if isinstance(part, int) and typing.get_origin(tp) is list:
            tp, field = typing.get_args(tp)[0], None
        elif isinstance(tp, type) and issubclass(tp, BaseModel):
            owner, field = tp, tp.model_fields.get(part)
            if field is None:  # extra_forbidden
                inside = "in " + ".".join(map(str, loc[:i])) if i else "at the top level"
                where = ".".join(map(str, loc))
                return f"recipe: unknown field {where} (allowed {inside}: {', '.join(owner.model_fields)})"
            tp = field.annotation
    if error["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal") and field:
        return f"recipe: {where} must be {_bounds(field)}, got {value}"
    return f"recipe: {where} must be {_expected(tp)}, got {value!r}"


def _set_dotted(data: dict, key: str, value, cls=Recipe):
    parts = key.split(".")
    node, owner, prefix = data, cls, ""
    for i, part in enumerate(parts):
        names = list(owner.model_fields)
        if part not in names:
            where = f"in {prefix[:-1]}" if prefix else "at the top level"
            raise AwakerError(f"override {key}: unknown field {prefix}{part} (allowed {where}: {', '.join(names)})")
        tp = owner.model_fields[part].annotation
        if i == len(parts) - 1:
            node[part] = value
            return
        if not (isinstance(tp, type) and issubclass(tp, BaseModel)):
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
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise AwakerError(_message(e.errors()[0])) from None


def load_recipe(name: str, overrides: list[str] = ()) -> Recipe:
    """Find, read, override and validate a recipe (nothing heavy is loaded)."""
    data = read_yaml(find_recipe(name))
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    return recipe_from_dict(data)


def check(r: Recipe) -> Recipe:
    """Cross-field rules that need no file access (paths are checked when training starts); the ranges of
    single fields are in the schema (Field(ge=...)), pydantic checks them first."""
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
