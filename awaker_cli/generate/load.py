"""Open any model directory this project writes (awaker, merged/dense Qwen2-VL, quantized exports) as an
Engine, checking the processor files first so that a broken directory fails before the weights load."""
from __future__ import annotations

import torch

from ..checkpoint.files import missing_processor_files
from ..checkpoint.reader import resolve_path
from ..errors import AwakerError
from ..model.config import CONFIG_NAME
from .engine import Engine

DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pick_device(requested: str | None) -> str:
    """'cuda' when a GPU is visible (or asked for), else 'cpu'."""
    if requested in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AwakerError(f"--device {requested}: no CUDA GPU is visible here (use --device cpu)")
        return requested
    raise AwakerError(f"--device must be cuda or cpu, got {requested!r}")


def load_processor(directory, **kwargs):
    from transformers import AutoProcessor

    missing = missing_processor_files(directory)
    if missing:
        raise AwakerError(f"{directory}: missing processor/tokenizer files: {', '.join(missing)} "
                          "(copy them from the base model's directory)")
    try:
        processor = AutoProcessor.from_pretrained(directory, **kwargs)
    except Exception as e:  # transformers raises many types here; all mean the files are unusable
        raise AwakerError(f"{directory}: processor files do not load ({type(e).__name__}: {e})")
    if not getattr(processor, "chat_template", None) or not hasattr(processor, "image_processor"):
        raise AwakerError(f"{directory}: not a Qwen2-VL processor with a chat template")
    return processor


def load_engine(path: str, *, device: str | None = None, dtype: str = "auto", min_pixels: int | None = None,
                max_pixels: int | None = None, use_graphs: bool | None = None, compile: bool = False,
                warm_up: bool | None = None) -> Engine:
    """An Engine for the model at `path` (awaker_config.json present: the LoRA-MoE model; else dense).
    warm_up: compile the kernels before returning (Engine.warm_up); default: on a GPU only."""
    from ..model import load_base, load_model

    if dtype not in DTYPES:
        raise AwakerError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    directory = resolve_path(path)
    processor = load_processor(directory)
    device = pick_device(device)
    device_map = None if device == "cpu" else device
    if (directory / CONFIG_NAME).is_file():
        model = load_model(directory, DTYPES[dtype], device_map)
    else:
        model, _ = load_base(directory, DTYPES[dtype], device_map)
    engine = Engine(model, processor, use_graphs=use_graphs, compile=compile, min_pixels=min_pixels,
                    max_pixels=max_pixels)
    if warm_up or (warm_up is None and engine.device.type == "cuda"):
        engine.warm_up()
    return engine
