"""Models with real shapes and random weights, for the GPU benchmarks (nothing to download).

SHAPES is the one place the benchmarks (decode.py, kernels.py, train.py, gpu_check.py) take each
family's real sizes from: Qwen2-VL-7B, Qwen2.5-VL-7B and Qwen3-VL-8B as their hub config.json files
give them (the transformers config classes' defaults are other sizes: Qwen2.5-VL's are the 72B's).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from awaker_cli.tiny import SPECIAL_TOKENS, qwen2vl_config


@dataclass(frozen=True)
class Shapes:
    label: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    rope_theta: float
    mrope_section: tuple[int, int, int]
    vision: dict = field(default_factory=dict)  # the family's vision_config fields

    @property
    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of the adapter-wrapped linears the kernel benchmark times (o, gate/up, down)."""
        return {"o": (self.heads * self.head_dim, self.hidden), "gate/up": (self.hidden, self.intermediate),
                "down": (self.intermediate, self.hidden)}

    @property
    def routers(self) -> int:
        """Routers of the default recipe: one for the attention linears and one for the MLP's, per layer."""
        return 2 * self.layers


SHAPES: dict[str, Shapes] = {
    # docs/design.md section 1
    "qwen2_vl": Shapes("Qwen2-VL-7B", hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, head_dim=128,
                       vocab=152064, max_positions=32768, rope_theta=1e6, mrope_section=(16, 24, 24),
                       vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4)),
    # the same language model as Qwen2-VL-7B; a window-attention vision tower with a SwiGLU MLP
    "qwen2_5_vl": Shapes("Qwen2.5-VL-7B", hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4,
                         head_dim=128, vocab=152064, max_positions=128000, rope_theta=1e6, mrope_section=(16, 24, 24),
                         vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                                     window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)),
    # q/k RMSNorm, interleaved mrope, DeepStack features from vision blocks 8, 16 and 24
    "qwen3_vl": Shapes("Qwen3-VL-8B", hidden=4096, intermediate=12288, layers=36, heads=32, kv_heads=8, head_dim=128,
                       vocab=151936, max_positions=262144, rope_theta=5e6, mrope_section=(24, 20, 20),
                       vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                                   num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24])),
}


def real_config(family: str, tokenizer):
    """The transformers config of `family`'s 7B/8B model, with the tiny tokenizer's special-token ids."""
    s = SHAPES[family]
    if family == "qwen2_vl":
        return qwen2vl_config(tokenizer, hidden=s.hidden, layers=s.layers, intermediate=s.intermediate,
                              heads=s.heads, kv_heads=s.kv_heads, vocab=s.vocab, max_positions=s.max_positions,
                              rope_theta=s.rope_theta, vision_depth=s.vision["depth"],
                              vision_embed=s.vision["embed_dim"], vision_heads=s.vision["num_heads"],
                              vision_mlp_ratio=s.vision["mlp_ratio"])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    rope = {"rope_type": "default", "rope_theta": s.rope_theta, "mrope_section": list(s.mrope_section)}
    text = dict(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
                num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, max_position_embeddings=s.max_positions,
                rms_norm_eps=1e-6, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    vision = dict(s.vision, out_hidden_size=s.hidden, spatial_merge_size=2, temporal_patch_size=2)
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  tie_word_embeddings=False)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig(text_config=dict(text, rope_parameters=rope), vision_config=vision, **tokens)
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(text_config=dict(text, head_dim=s.head_dim, rope_parameters=dict(rope, mrope_interleaved=True)),
                         vision_config=vision, **tokens)


def qwen2vl_7b_config(tokenizer):
    """Qwen2-VL-7B's shapes with the tiny tokenizer's special-token ids."""
    return real_config("qwen2_vl", tokenizer)


def build_model(config, device, dtype):
    """A random model of `config`'s family (its own transformers class) on `device`."""
    from transformers.utils import logging

    from awaker_cli.model.families import family_of_config

    logging.set_verbosity_error()
    torch.manual_seed(0)
    with torch.device(device):
        model = family_of_config(config).load_class()._from_config(config, dtype=dtype)
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
