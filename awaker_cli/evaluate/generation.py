"""Batched greedy answers for chat prompts with images.

`answer_samples` is what eval runs: the project's generation engine (awaker_cli/generate/: static KV
cache, routing once per request, CUDA-graph decode on a GPU), the same engine `awaker chat` uses.

`prepare` + `generate_answers` run transformers' own `generate` instead. They stay for two reasons: they
are the reference the engine's answers are tested against (tests/test_eval.py), and they work on a model
that is still training (synth/pretrain.py measures accuracy between optimizer steps), which the engine
must not be given: it merges the q/k/v LoRA and fuses q/k/v into new parameters in place.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image


def stop_ids(tokenizer) -> list[int]:
    # Instruct checkpoints end a turn with <|im_end|>, base ones with <|endoftext|>: stop at either.
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    return [i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id] or [tokenizer.eos_token_id]


def eval_engine(model, processor, min_pixels: int | None = None, max_pixels: int | None = None):
    """An Engine for `model` that stops where eval always stopped (stop_ids) as well as where chat does.
    The model is prepared for inference in place (see the module docstring). Images at the processor's
    pixel limits (a trained model's processor holds its training's) unless given."""
    from ..generate import Engine

    engine = Engine(model, processor, min_pixels=min_pixels, max_pixels=max_pixels)
    engine.stop_ids |= set(stop_ids(processor.tokenizer))
    return engine


def request(prompt: list[dict], images: Sequence) -> list[dict]:
    """An engine request: the prompt's messages with its images (paths or PIL images), in order, in place
    of the {"type": "image"} placeholders."""
    remaining = iter(images)
    messages = []
    for message in prompt:
        content = message["content"]
        if not isinstance(content, str):
            content = [{"type": "image", "image": next(remaining)} if part.get("type") == "image" else part
                       for part in content]
        messages.append({**message, "content": content})
    return messages


def answer_samples(engine, prompts: Sequence[list[dict]], images: Sequence[Sequence], max_new_tokens: int = 32):
    """Greedy answers (engine Generations, `.text` decoded without special tokens) for a batch of chat
    prompts (messages ending with a user turn), each with its images."""
    from ..generate import SamplingParams

    requests = [request(p, ims) for p, ims in zip(prompts, images, strict=True)]
    return engine.generate(requests, SamplingParams(max_new_tokens=max_new_tokens))


def prepare(processor, prompts: Sequence[list[dict]], images: Sequence[Sequence[Image.Image]]):
    """Left-padded processor inputs for a batch of chat prompts (messages ending with a user turn)."""
    texts = [processor.apply_chat_template(p, add_generation_prompt=True) for p in prompts]
    flat = [im for per_sample in images for im in per_sample]
    processor.tokenizer.padding_side = "left"  # generation appends on the right
    return processor(text=texts, images=flat or None, padding=True, return_tensors="pt")


@torch.no_grad()
def generate_answers(model, processor, inputs, max_new_tokens: int = 32, stop: Sequence[int] | None = None) -> list[str]:
    """transformers' greedy `generate` on a prepared batch, decoded without special tokens and stripped;
    it stops at `stop` (default: stop_ids).

    For an awaker model the prefill routes each sequence once; model.awaker_state.current then holds
    that routing (decode steps reuse it)."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    stop = list(stop) if stop is not None else stop_ids(processor.tokenizer)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         eos_token_id=stop, pad_token_id=processor.tokenizer.pad_token_id or stop[0])
    new = out[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
