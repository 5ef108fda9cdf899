"""Models with real shapes and random weights, for the GPU benchmarks (nothing to download)."""
from __future__ import annotations

import torch

from awaker_cli.tiny import qwen2vl_config


def qwen2vl_7b_config(tokenizer):
    """Qwen2-VL-7B's shapes (docs/design.md section 1) with the tiny tokenizer's special-token ids."""
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


@torch.no_grad()
def quantize_decoder_linears(model, method: str, dtype: torch.dtype):
    """Swap every linear of the language model's decoder layers for a bitsandbytes layer holding its
    weight quantized (nf4/fp4 blockwise 4 bit, or int8), as loading an `awaker export` gives: the
    embeddings, lm_head and vision tower stay in `dtype` (the export's SKIP_MODULES)."""
    import bitsandbytes as bnb

    from awaker_cli.model.build import decoder_layers, fix_bnb_model

    for layer in decoder_layers(model):
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if type(linear) is not torch.nn.Linear:
                    continue
                shape = (linear.in_features, linear.out_features)
                if method == "int8":
                    q = bnb.nn.Linear8bitLt(*shape, bias=linear.bias is not None, has_fp16_weights=False,
                                           threshold=0.0)  # as `awaker export` writes: graph-capturable
                    q.weight = bnb.nn.Int8Params(linear.weight.data.to(dtype), requires_grad=False,
                                                 has_fp16_weights=False)
                else:
                    q = bnb.nn.Linear4bit(*shape, bias=linear.bias is not None, compute_dtype=dtype,
                                          quant_type=method, quant_storage=torch.uint8)
                    q.weight = bnb.nn.Params4bit(linear.weight.data.to(dtype), requires_grad=False,
                                                 quant_type=method, quant_storage=torch.uint8)
                if linear.bias is not None:
                    q.bias = torch.nn.Parameter(linear.bias.data.to(dtype), requires_grad=False)
                setattr(parent, name, q.to(linear.weight.device))  # moving the weight quantizes it
    fix_bnb_model(model, None)
