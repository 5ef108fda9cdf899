"""A tiny but real Qwen2-VL checkpoint, built offline: config, random weights, a byte-level BPE tokenizer
with Qwen's special tokens and chat template, and the real Qwen2-VL image processor.

Tests and the demo use it because no weights can be downloaded here. `layout="v5"` writes the
transformers-5 in-memory key names (model.language_model.*, model.visual.*) instead of the hub's.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2-VL's chat template: a default system turn, images as <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = (
    "a picture of a red circle and a blue square . the image shows three green triangles . "
    "what colour is the shape ? how many shapes are there ? read the digit . describe the image . "
    "one two three four five six seven eight nine zero 0 1 2 3 4 5 6 7 8 9 yellow purple orange white "
    "black small large left right top bottom you are a helpful assistant answer with a word or a number "
    "color count caption tags json { } \" : , the a an is are of in on with and"
)


def build_tokenizer():
    """A small byte-level BPE with Qwen2's special tokens, wrapped as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return Qwen2Tokenizer(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        bos_token=None, extra_special_tokens=None,
    )


def build_processor(min_pixels: int = 56 * 56, max_pixels: int = 112 * 112, tokenizer=None):
    """The real Qwen2-VL processor with Qwen2-VL's chat template (tokenizer: default build_tokenizer())."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    video_processor = Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return Qwen2VLProcessor(image_processor=image_processor, video_processor=video_processor,
                            tokenizer=tokenizer or build_tokenizer(), chat_template=CHAT_TEMPLATE)


def qwen2vl_config(tokenizer, *, hidden: int, layers: int, intermediate: int, heads: int = 4, kv_heads: int = 2,
                   vocab: int | None = None, vocab_multiple: int = 8, max_positions: int = 2048,
                   rope_theta: float = 10000.0, vision_depth: int = 1, vision_embed: int = 32, vision_heads: int = 2,
                   vision_mlp_ratio: int = 2):
    """A Qwen2VLConfig of the given shapes, with `tokenizer`'s special-token ids. The mrope sections
    (temporal, height, width) split head_dim / 2 as Qwen2-VL's 16, 24, 24 of 64 do. vocab: default the
    tokenizer's size rounded up to `vocab_multiple`."""
    from transformers import Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    half = hidden // heads // 2
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab or (len(tokenizer) + vocab_multiple - 1) // vocab_multiple * vocab_multiple,
            hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv_heads, max_position_embeddings=max_positions, rms_norm_eps=1e-6,
            rope_theta=rope_theta, rope_scaling={"type": "mrope", "mrope_section": section},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=vision_depth, embed_dim=vision_embed, hidden_size=hidden, num_heads=vision_heads,
                           mlp_ratio=vision_mlp_ratio, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def tiny_config(tokenizer, hidden: int = 64, layers: int = 2, intermediate: int = 96):
    return qwen2vl_config(tokenizer, hidden=hidden, layers=layers, intermediate=intermediate)


def build_tiny_base(out: str | Path, *, layout: str = "hub", max_shard_size: int | None = None,
                    flat_config: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Write a tiny random Qwen2-VL checkpoint (weights, config, processor files) to `out`."""
    from transformers import Qwen2VLForConditionalGeneration

    from .model.save import write_tensors
    from transformers.utils import logging

    logging.disable_progress_bar()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    processor = build_processor()
    config = tiny_config(processor.tokenizer)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).to(dtype).eval()
    for p in model.parameters():  # HF's init leaves some norms at exactly 1: perturb so tests see everything
        p.data.add_(torch.randn_like(p) * 0.02)
    if layout == "hub":
        model.save_pretrained(out, max_shard_size=max_shard_size or "5GB")
    elif layout == "v5":
        config.save_pretrained(out)
        write_tensors(out, model.state_dict(), max_shard_size or 5 * 1000**3)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    processor.save_pretrained(out)
    if flat_config:
        _flatten_config(out / "config.json")
    return out


def _flatten_config(path: Path):
    """Rewrite a nested transformers-5 config.json in the flat form of the original hub releases."""
    cfg = json.loads(path.read_text())
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters", None) or {}
    for k, v in text.items():
        if k not in ("model_type", "layer_types", "dtype"):
            cfg.setdefault(k, v)
    cfg["rope_theta"] = rope.get("rope_theta", 10000.0)
    cfg["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    vision = cfg["vision_config"]
    vision.pop("rope_parameters", None)
    path.write_text(json.dumps(cfg, indent=2))
