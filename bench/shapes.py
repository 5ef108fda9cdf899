"""Models with real shapes and random weights, for the GPU benchmarks (nothing to download)."""
from __future__ import annotations

import torch

from awaker_cli.tiny import qwen2vl_config


def qwen2vl_7b_config(tokenizer):
    """Qwen2-VL-7B's shapes (DESIGN.md section 1) with the tiny tokenizer's special-token ids."""
    return qwen2vl_config(tokenizer, hidden=3584, layers=28, intermediate=18944, heads=28, kv_heads=4, vocab=152064,
                          max_positions=32768, rope_theta=1e6, vision_depth=32, vision_embed=1280, vision_heads=16,
                          vision_mlp_ratio=4)


def build_model(config, device, dtype):
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()
