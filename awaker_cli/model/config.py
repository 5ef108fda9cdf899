"""AwakerConfig: the LoRA-MoE settings of a model, saved beside config.json as awaker_config.json."""
from __future__ import annotations

import math

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AwakerError

CONFIG_NAME = "awaker_config.json"
FORMAT_VERSION = 1

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
LINEARS = ATTENTION_LINEARS + MLP_LINEARS
COMBINE_MODES = ("release", "convex")
# prompt: docs/design.md's span; prompt-text: that span without its image tokens (the router then sees the
# question, not mostly the picture); all: every token.
SPAN_RULES = ("prompt", "prompt-text", "all")


def _release_router_owners() -> dict[str, str]:
    # The paper's "simplified MoE": o_proj has its own router, up/down reuse gate_proj's.
    return {"o_proj": "o_proj", "gate_proj": "gate_proj", "up_proj": "gate_proj", "down_proj": "gate_proj"}


@dataclass
class AwakerConfig:
    num_experts: int = 4
    rank: int = 256
    alpha: float = 512.0
    dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    moe_targets: list[str] = field(default_factory=lambda: ["o_proj", "gate_proj", "up_proj", "down_proj"])
    top_k: int = 1
    global_expert: bool = True
    router_temperature: float = 1.0
    router_noise_std: float = 0.1
    router_norm_eps: float = 1e-6
    # MoE target -> the MoE target whose router it uses (an owner maps to itself).
    router_owners: dict[str, str] = field(default_factory=_release_router_owners)
    # release: y = Wx + p²·E + (1−p)·G (what the public release computes); convex: p·E + (1−p)·G.
    combine: str = "release"
    # One of SPAN_RULES; prompt: docs/design.md's span (from <|vision_start|> or the user turn to its <|im_end|>).
    routing_span: str = "prompt"
    # Token ids the span rule looks for, read from the base's config and tokenizer at upcycle time.
    span_token_ids: dict[str, int] = field(default_factory=dict)
    num_layers: int = 0
    base_model: str = ""
    # The base's model family (model/families.py); directories written before families existed are Qwen2-VL.
    family: str = "qwen2_vl"
    format_version: int = FORMAT_VERSION

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def num_slots(self) -> int:
        """Stacked expert slots per MoE linear: the routed experts, then the global expert."""
        return self.num_experts + (1 if self.global_expert else 0)

    @property
    def router_names(self) -> list[str]:
        """The MoE targets that own a router, in moe_targets order."""
        return [t for t in self.moe_targets if self.router_owners[t] == t]

    @property
    def num_routers(self) -> int:
        return self.num_layers * len(self.router_names)

    def router_index(self, layer: int, target: str) -> int:
        owners = self.router_names
        return layer * len(owners) + owners.index(self.router_owners[target])

    def validate(self) -> "AwakerConfig":
        def bad(msg: str):
            raise AwakerError(f"invalid awaker config: {msg}")

        if self.format_version != FORMAT_VERSION:
            bad(f"format_version {self.format_version} is not supported (this awaker reads {FORMAT_VERSION})")
        if self.num_experts < 1:
            bad(f"experts must be at least 1, got {self.num_experts}")
        if self.rank < 1:
            bad(f"rank must be at least 1, got {self.rank}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            bad(f"alpha must be a positive number, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            bad(f"dropout must be in [0, 1), got {self.dropout}")
        if not 1 <= self.top_k <= self.num_experts:
            bad(f"top-k must be between 1 and the number of experts ({self.num_experts}), got {self.top_k}")
        if not math.isfinite(self.router_temperature) or self.router_temperature <= 0:
            bad(f"router temperature must be a positive number, got {self.router_temperature}")
        if not math.isfinite(self.router_noise_std) or self.router_noise_std < 0:
            bad(f"router noise must be >= 0, got {self.router_noise_std}")
        for t in [*self.lora_targets, *self.moe_targets]:
            if t not in LINEARS:
                bad(f"unknown target module {t!r}; choose from {', '.join(LINEARS)}")
        both = set(self.lora_targets) & set(self.moe_targets)
        if both:
            bad(f"{', '.join(sorted(both))} cannot be both a LoRA and a MoE target")
        if len(set(self.lora_targets)) != len(self.lora_targets) or len(set(self.moe_targets)) != len(self.moe_targets):
            bad("a target module is listed twice")
        for t in self.moe_targets:
            owner = self.router_owners.get(t)
            if owner is None:
                bad(f"MoE target {t!r} has no router: add it to router_owners")
            if owner not in self.moe_targets or self.router_owners.get(owner) != owner:
                bad(f"{t!r} reuses the router of {owner!r}, which is not a MoE target owning a router")
        if self.combine not in COMBINE_MODES:
            bad(f"combine must be one of {', '.join(COMBINE_MODES)}, got {self.combine!r}")
        from .families import FAMILIES

        if self.family not in FAMILIES:
            bad(f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.routing_span not in SPAN_RULES:
            bad(f"routing_span must be one of {', '.join(SPAN_RULES)}, got {self.routing_span!r}")
        return self

    def with_moe_targets_only_owners(self) -> "AwakerConfig":
        """Drop router_owners entries for modules that are not MoE targets (after the user narrows them)."""
        owners = {t: o for t, o in self.router_owners.items() if t in self.moe_targets}
        for t in self.moe_targets:
            owners.setdefault(t, t)
            if owners[t] not in self.moe_targets:  # its owner was dropped: the module gets its own router
                owners[t] = t
        return dataclasses.replace(self, router_owners=owners)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "AwakerConfig":
        if not isinstance(data, dict):
            raise AwakerError("invalid awaker config: not a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AwakerError(f"invalid awaker config: unknown field(s) {', '.join(unknown)}")
        try:
            return cls(**data).validate()
        except (TypeError, ValueError, AttributeError) as e:  # a field of the wrong type
            raise AwakerError(f"invalid awaker config: a field has the wrong type ({e})")

    def save(self, directory: str | Path):
        Path(directory, CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "AwakerConfig":
        path = Path(directory, CONFIG_NAME)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise AwakerError(f"{directory}: no {CONFIG_NAME} (not an awaker model; run `awaker upcycle` first)")
        except json.JSONDecodeError as e:
            raise AwakerError(f"{path}: not valid JSON ({e})")
        return cls.from_dict(data)
