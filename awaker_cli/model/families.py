"""The model families awaker accepts, described as data in one place (as mergekit describes architectures).

Everything else asks this registry instead of naming a family: which transformers class loads a
directory, how its config.json nests the text fields, how its tensors are named on disk, where the
language model's decoder layers are, which linears adapters may wrap, which special tokens the routing
span rule reads, which processor and which modules quantization must skip. Adding a family is one new
entry here plus its tiny model (awaker_cli/tiny.py) and its tests (docs/design.md, "Model families").

Key names: inside awaker every tensor has its *canonical* name, the Qwen2-VL hub layout
(`model.layers.N…`, `model.embed_tokens…`, `visual.…`, `lm_head.…`, see checkpoint/keys.py). Each family
says how its hub files spell the same tensors (`disk_key`), so what awaker writes loads in the family's
own transformers class.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import AwakerError

# The linears of a decoder layer that adapters may target. Only the language model's layers are ever
# walked (decoder_layers): Qwen2.5-VL's vision blocks also have gate/up/down_proj and are never wrapped.
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")

# Canonical prefix -> the family's on-disk prefix (first match wins; others are written as they are).
_LM_UNDER_LANGUAGE_MODEL = (("model.", "model.language_model."), ("visual.", "model.visual."))


@dataclass(frozen=True)
class Family:
    name: str  # config.json model_type
    label: str  # what users read
    model_class: str  # transformers class of the whole model (vision tower + language model + head)
    processor_class: str
    modeling_module: str  # where transformers keeps its modeling code (the engine reuses its functions)
    # Canonical -> on-disk key prefixes of the family's hub checkpoints (empty: the canonical names).
    disk_prefixes: tuple[tuple[str, str], ...] = ()
    # Modules bitsandbytes must leave in full precision (the name it matches is the full module name).
    quantize_skip: tuple[str, ...] = ("lm_head", "visual", "model.visual")
    # config.json fields (top level) holding the special token ids the model itself uses.
    token_fields: tuple[str, ...] = ("image_token_id", "video_token_id", "vision_start_token_id",
                                     "vision_end_token_id")
    # Attributes from the loaded model to its language model and vision tower (transformers 5).
    language_model_path: str = "model.language_model"
    vision_path: str = "model.visual"
    # Does the generation engine (awaker_cli/generate/engine.py) reproduce this family's forward?
    engine: bool = False
    engine_note: str = ""
    # Text-attention extras the family has beyond Qwen2's (documentation and checks).
    qk_norm: bool = False
    deepstack: bool = False

    def load_class(self):
        import transformers

        return getattr(transformers, self.model_class)

    def load_processor_class(self):
        import transformers

        return getattr(transformers, self.processor_class)

    def modeling(self):
        return importlib.import_module(self.modeling_module)

    def disk_key(self, key: str) -> str:
        """The family's hub name of a canonical key."""
        for canonical, disk in self.disk_prefixes:
            if key.startswith(canonical):
                return disk + key[len(canonical):]
        return key

    def language_model(self, model):
        return _attr(model, self.language_model_path)

    def vision(self, model):
        return _attr(model, self.vision_path)

    def decoder_layers(self, model):
        return self.language_model(model).layers

    def text_config(self, config: dict) -> dict:
        """Text fields whether config.json nests them (transformers 5) or is flat (the original releases)."""
        return config.get("text_config") or config

    def token_ids(self, config: dict) -> dict[str, int]:
        out = {}
        for name in self.token_fields:
            value = config.get(name, self.text_config(config).get(name))
            if value is not None:
                out[name] = int(value)
        return out


def _attr(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family(
        name="qwen2_vl", label="Qwen2-VL", model_class="Qwen2VLForConditionalGeneration",
        processor_class="Qwen2VLProcessor",
        modeling_module="transformers.models.qwen2_vl.modeling_qwen2_vl",
        engine=True,
    ),
    Family(
        name="qwen2_5_vl", label="Qwen2.5-VL", model_class="Qwen2_5_VLForConditionalGeneration",
        processor_class="Qwen2_5_VLProcessor",
        modeling_module="transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
        # Same hub layout as Qwen2-VL (transformers maps it the same way); window attention lives only in
        # the vision tower, whose blocks have gate/up/down_proj of their own (never adapter targets).
        engine=True,
    ),
    Family(
        name="qwen3_vl", label="Qwen3-VL", model_class="Qwen3VLForConditionalGeneration",
        processor_class="Qwen3VLProcessor",
        modeling_module="transformers.models.qwen3_vl.modeling_qwen3_vl",
        # Qwen3-VL's hub files already use transformers 5's names (model.language_model.*, model.visual.*).
        disk_prefixes=_LM_UNDER_LANGUAGE_MODEL,
        # The engine applies its q/k RMSNorm, its (interleaved mrope) rotary module and DeepStack features.
        engine=True, qk_norm=True, deepstack=True,
    ),
)}
DEFAULT_FAMILY = "qwen2_vl"  # what an awaker_config.json without a `family` field was made from


def supported() -> str:
    return ", ".join(FAMILIES)


def family(name: str | None) -> Family:
    """The family of a model_type (None: the default, for directories written before families existed)."""
    name = name or DEFAULT_FAMILY
    try:
        return FAMILIES[name]
    except KeyError:
        raise AwakerError(f"unknown model family {name!r}; supported: {supported()}") from None


def family_of_config(config) -> Family:
    """The family of a config.json dict or a transformers config object."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return family(model_type)


def family_of_model(model) -> Family:
    return family_of_config(model.config)
