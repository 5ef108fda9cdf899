"""Models with real shapes and random weights, for the GPU benchmarks (nothing to download)."""
from __future__ import annotations

import torch


def qwen2vl_7b_config(tokenizer):
    """Qwen2-VL-7B's shapes (DESIGN.md section 1) with the tiny tokenizer's special-token ids."""
    from transformers import Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    return Qwen2VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                         rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_model(config, device, dtype):
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()
