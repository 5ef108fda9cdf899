"""A tiny but real checkpoint of each model family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), built offline:
config, random weights, a byte-level BPE tokenizer with Qwen's special tokens and chat template, and the
family's real processor.

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


def build_processor(min_pixels: int = 56 * 56, max_pixels: int = 112 * 112, tokenizer=None,
                    family: str = "qwen2_vl"):
    """The family's real processor with Qwen's chat template (tokenizer: default build_tokenizer()).
    Qwen3-VL's vision tower has 16-pixel patches and normalises to [-1, 1], as its hub processor does."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from .model.families import family as get_family

    fam = get_family(family)
    if fam.name == "qwen3_vl":
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        scale = (16 / 14) ** 2  # the same number of merged tokens per image as the 14-pixel families
        norm = dict(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        image_processor = Qwen2VLImageProcessor(min_pixels=round(min_pixels * scale),
                                                max_pixels=round(max_pixels * scale), **norm)
        video_processor = Qwen3VLVideoProcessor(size={"shortest_edge": round(min_pixels * scale),
                                                      "longest_edge": round(max_pixels * scale)}, **norm)
    else:
        image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
        video_processor = Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return fam.load_processor_class()(image_processor=image_processor, video_processor=video_processor,
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


def family_config(family: str, tokenizer, *, hidden: int, layers: int, intermediate: int, heads: int = 4,
                  kv_heads: int = 2, vision_depth: int = 2, vision_hidden: int = 32, vision_heads: int = 2,
                  vision_intermediate: int = 48):
    """A tiny config of a family other than Qwen2-VL, with `tokenizer`'s special-token ids (Qwen2-VL:
    qwen2vl_config). Qwen2.5-VL: a window-attention vision tower (one full-attention block); Qwen3-VL:
    head_dim given, interleaved mrope, DeepStack features from every vision block."""
    from .model.families import family as get_family

    fam = get_family(family)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    half = hidden // heads // 2
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    text = dict(vocab_size=(len(tokenizer) + 7) // 8 * 8, hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_intermediate,
                  num_heads=vision_heads, out_hidden_size=hidden, spatial_merge_size=2, temporal_patch_size=2)
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  tie_word_embeddings=False)
    if fam.name == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig(text_config=dict(text, rope_parameters=rope),
                                vision_config=dict(vision, patch_size=14, window_size=56,
                                                   fullatt_block_indexes=[vision_depth - 1]), **tokens)
    if fam.name == "qwen3_vl":
        from transformers import Qwen3VLConfig

        return Qwen3VLConfig(text_config=dict(text, head_dim=hidden // heads,
                                              rope_parameters=dict(rope, mrope_interleaved=True)),
                             vision_config=dict(vision, patch_size=16, num_position_embeddings=64,
                                                deepstack_visual_indexes=list(range(vision_depth))), **tokens)
    raise ValueError(f"no tiny config for family {family!r}")


def tiny_config(tokenizer, hidden: int = 64, layers: int = 2, intermediate: int = 96, family: str = "qwen2_vl"):
    if family == "qwen2_vl":
        return qwen2vl_config(tokenizer, hidden=hidden, layers=layers, intermediate=intermediate)
    return family_config(family, tokenizer, hidden=hidden, layers=layers, intermediate=intermediate)


def build_tiny_base(out: str | Path, *, layout: str = "hub", max_shard_size: int | None = None,
                    flat_config: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32,
                    family: str = "qwen2_vl"):
    """Write a tiny random checkpoint of `family` (weights, config, processor files) to `out`.

    layout hub: the family's hub names (save_pretrained); v5: transformers 5's in-memory names (for
    Qwen3-VL, whose hub files already use them, the two are the same)."""
    from .model.families import family as get_family
    from .model.save import write_tensors
    from transformers.utils import logging

    logging.disable_progress_bar()
    fam = get_family(family)
    if flat_config and fam.name != "qwen2_vl":
        raise ValueError("flat_config: only Qwen2-VL's original releases had a flat config.json")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    processor = build_processor(family=fam.name)
    config = tiny_config(processor.tokenizer, family=fam.name)
    torch.manual_seed(seed)
    model = fam.load_class()(config).to(dtype).eval()
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
