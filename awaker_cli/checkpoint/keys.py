"""Key layouts. On disk we write the hub layout (model.layers.N…, visual.…, lm_head.…); transformers 5
holds the same tensors in memory as model.language_model.… and model.visual.…; both are accepted."""
from __future__ import annotations

import re

_LM_LINEAR = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.(weight|bias)$")
ROUTER_PREFIX = "awaker_routers."
ADAPTER_SUFFIXES = (".lora_A", ".lora_B")


def to_hub(key: str) -> str:
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


def lm_linear(key: str) -> tuple[int, str, str] | None:
    """(layer, projection name, weight|bias) for a hub key of a language-model linear, else None."""
    m = _LM_LINEAR.match(key)
    return (int(m.group(1)), m.group(3), m.group(4)) if m else None


def lm_module_path(layer: int, proj: str) -> str:
    block = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{block}.{proj}"


def is_adapter_key(key: str) -> bool:
    return key.startswith(ROUTER_PREFIX) or key.endswith(ADAPTER_SUFFIXES)
