"""Batched greedy answers for chat prompts with images. The one place that calls the generator, so a
faster engine (awaker_cli/generate/) can replace HF `generate` here without touching the metrics."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image


def _stop_ids(tokenizer) -> list[int]:
    # Instruct checkpoints end a turn with <|im_end|>, base ones with <|endoftext|>: stop at either.
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    return [i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id] or [tokenizer.eos_token_id]


def prepare(processor, prompts: Sequence[list[dict]], images: Sequence[Sequence[Image.Image]]):
    """Left-padded processor inputs for a batch of chat prompts (messages ending with a user turn)."""
    texts = [processor.apply_chat_template(p, add_generation_prompt=True) for p in prompts]
    flat = [im for per_sample in images for im in per_sample]
    processor.tokenizer.padding_side = "left"  # generation appends on the right
    return processor(text=texts, images=flat or None, padding=True, return_tensors="pt")


@torch.no_grad()
def generate_answers(model, processor, inputs, max_new_tokens: int = 32) -> list[str]:
    """Greedy continuation of a prepared batch, decoded without special tokens and stripped.

    For an awaker model the prefill routes each sequence once; model.awaker_state.current then holds
    that routing (decode steps reuse it)."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    stop = _stop_ids(processor.tokenizer)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         eos_token_id=stop, pad_token_id=processor.tokenizer.pad_token_id or stop[0])
    new = out[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
