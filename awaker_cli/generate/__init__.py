"""Fast generation: the engine (static KV cache, routing once per request, CUDA-graph decode), the chat
session behind `awaker chat`, and routing reports."""
from .engine import Engine, Generation, Request, TokenStream, load_image
from .load import load_engine, pick_device
from .report import format_routing, routing_report
from .sampling import SamplingParams, sample
from .session import ChatSession, interactive, stats_line

__all__ = [
    "ChatSession", "Engine", "Generation", "Request", "SamplingParams", "TokenStream", "format_routing",
    "interactive", "load_engine", "load_image", "pick_device", "routing_report", "sample", "stats_line",
]
