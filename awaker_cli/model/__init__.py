"""THE awaker model definition, shared by every command."""
from .build import (adapter_state_dict, attach_adapters, base_state_dict, decoder_layers, load_base, load_model,
                    merge_lora)
from .config import AwakerConfig
from .layers import LoRALinear, MoELoRALinear, RouterBank
from .save import save_model, write_tensors
from .routing import Routing, RoutingState, SpanTokens, routing_spans, span_mean

__all__ = [
    "AwakerConfig", "LoRALinear", "MoELoRALinear", "RouterBank", "Routing", "RoutingState", "SpanTokens",
    "adapter_state_dict", "attach_adapters", "base_state_dict", "decoder_layers", "load_base", "load_model",
    "merge_lora", "routing_spans", "save_model", "span_mean", "write_tensors",
]
