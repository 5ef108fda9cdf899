"""Build THE awaker model: the family's transformers class (model/families.py: Qwen2-VL, Qwen2.5-VL,
Qwen3-VL) with only the language model's target linears swapped for adapter layers, a bank of routers, and the hooks that route each sequence
once from the mean of its prompt-span input embeddings (image features already substituted)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint.keys import ROUTER_PREFIX, is_adapter_key, lm_module_path, to_hub
from ..checkpoint.reader import Checkpoint
from ..errors import AwakerError
from .config import AwakerConfig
from .families import family_of_model
from .layers import LoRALinear, MoELoRALinear, RouterBank
from .routing import Routing, RoutingState, SpanTokens, image_tokens, routing_spans, span_mean


def decoder_layers(model) -> nn.ModuleList:
    """The language model's decoder layers: the only place adapters go (never the vision tower)."""
    return family_of_model(model).decoder_layers(model)


def _linear_parent(layer: nn.Module, proj: str) -> nn.Module:
    return layer.self_attn if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp


def attach_adapters(model, cfg: AwakerConfig, adapter_dtype: torch.dtype | None = None):
    """Swap the target linears of `model` (in place) and attach routers, routing state and hooks.

    Returns the same model object, now with `awaker_config`, `awaker_routers` and `awaker_state`.
    """
    if hasattr(model, "awaker_config"):
        raise ValueError("adapters are already attached to this model")
    cfg.validate()
    layers = decoder_layers(model)
    fam = family_of_model(model)
    if cfg.family != fam.name:
        raise AwakerError(f"awaker config is for a {cfg.family} base, this model is {fam.name}")
    if cfg.num_layers != len(layers):
        raise AwakerError(f"awaker config is for {cfg.num_layers} layers, the base model has {len(layers)}")
    if adapter_dtype is None and _is_quantized(model):  # packed base weights: adapters take the model's dtype
        adapter_dtype = model.get_input_embeddings().weight.dtype
    state = RoutingState()
    for i, layer in enumerate(layers):
        for proj in cfg.lora_targets:
            parent = _linear_parent(layer, proj)
            setattr(parent, proj, LoRALinear(getattr(parent, proj), cfg.rank, cfg.alpha, cfg.dropout,
                                             dtype=adapter_dtype))
        for proj in cfg.moe_targets:
            parent = _linear_parent(layer, proj)
            setattr(parent, proj, MoELoRALinear(
                getattr(parent, proj), cfg.rank, cfg.alpha, cfg.num_experts, cfg.global_expert,
                cfg.router_index(i, proj), state, cfg.dropout, dtype=adapter_dtype))
    embed = model.get_input_embeddings().weight
    model.awaker_routers = RouterBank(
        cfg.num_routers, embed.shape[1], cfg.num_experts, eps=cfg.router_norm_eps,
        temperature=cfg.router_temperature, top_k=cfg.top_k, noise_std=cfg.router_noise_std,
        combine=cfg.combine, global_expert=cfg.global_expert, device=embed.device,
        dtype=adapter_dtype or embed.dtype)
    model.awaker_config = cfg
    model.awaker_state = state
    _install_routing_hooks(model)
    return model


def _is_quantized(model) -> bool:
    return any(not p.is_floating_point() for p in family_of_model(model).language_model(model).parameters())


def fix_bnb_model(model, dtype: torch.dtype | None):
    """Two fixes after transformers loads a bitsandbytes export (or bench/shapes.py quantizes in memory):
    - given a dtype, transformers 5 casts only some of the unquantized tensors (norms yes, skipped linears
      such as the vision tower's no), which breaks the forward: cast every float tensor outside the
      quantized layers (those compute in their own compute dtype and return the input's);
    - bitsandbytes 0.50's CPU fast path for 4-bit weights (avx512-bf16 CPUs) repacks the weight assuming
      in_features is a multiple of the quantization block and fails otherwise (only tiny test models have
      such widths): use its generic path for those layers."""
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if hasattr(module, "support_avx512bf16_for_cpu") and state is not None \
                and module.in_features % state.blocksize:
            module.support_avx512bf16_for_cpu = False
        quantized = any(not p.is_floating_point() for p in module.parameters(recurse=False))
        if dtype is not None and not quantized:
            for p in module.parameters(recurse=False):
                if p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)


def model_span_tokens(model) -> SpanTokens:
    """The token ids the routing span rule looks for, from the awaker config (vision_start: the model's)."""
    ids = dict(model.awaker_config.span_token_ids)
    ids.setdefault("vision_start", model.config.vision_start_token_id)  # top level in every family
    missing = {"im_start", "im_end"} - set(ids)
    if missing:
        raise AwakerError(f"awaker config lacks span_token_ids {sorted(missing)}")
    return SpanTokens(ids["vision_start"], ids["im_start"], ids["im_end"])


def route(model, input_ids, attention_mask, embeds) -> Routing:
    """Every router of `model` on the mean of `embeds` (the language model's input embeddings, image
    features substituted) over each sequence's span: explicit `awaker_state.spans` if set (they serve
    one prefill only), else the span rule applied to input_ids. The prompt-text rule leaves the image
    tokens out of the mean here, in every path (training's explicit spans are the prompt range)."""
    state = model.awaker_state
    rule = model.awaker_config.routing_span
    spans, state.spans = state.spans, None
    if spans is None:
        if input_ids is None:
            raise AwakerError("routing needs input_ids (or explicit spans) to find the prompt span")
        spans = routing_spans(input_ids, attention_mask, model_span_tokens(model), rule)
    skip = None
    if rule == "prompt-text":
        if input_ids is None:
            raise AwakerError("the prompt-text routing span needs input_ids to find the image tokens")
        skip = image_tokens(input_ids, model.config)
    return model.awaker_routers(span_mean(embeds, spans.to(embeds.device), attention_mask, skip))


def continues_sequences(input_ids, args, kwargs) -> bool:
    """Whether a forward call continues sequences that earlier calls started (a decode step).

    Decided from what the call carries, not from one keyword: transformers releases have renamed the
    cache argument (`past_key_values` until 5.23, `cache` in 5.24), so any KV cache among the arguments
    that already holds tokens counts, and so does an attention mask longer than the new tokens (HF's
    mask covers the cached tokens too) or a cache_position that does not start at 0.
    """
    from transformers import Cache

    for value in (*args, *kwargs.values()):
        if isinstance(value, Cache) and value.get_seq_length() > 0:
            return True
    mask = kwargs.get("attention_mask")
    if torch.is_tensor(input_ids) and torch.is_tensor(mask) and mask.dim() == 2 \
            and mask.shape[-1] > input_ids.shape[-1]:
        return True
    position = kwargs.get("cache_position")
    return torch.is_tensor(position) and position.numel() > 0 and int(position.reshape(-1)[0]) > 0


def _install_routing_hooks(model):
    state: RoutingState = model.awaker_state
    model_span_tokens(model)  # fail at load time, not at the first forward, if the config lacks them

    def capture_request(module, args, kwargs):
        # A forward with no earlier tokens starts new sequences: route them. One that continues them
        # (decode) keeps the routing of their prefill.
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if continues_sequences(input_ids, args, kwargs):
            state._pending = None
            return
        state._pending = (input_ids, kwargs.get("attention_mask"))

    no_routers = model.awaker_config.num_routers == 0  # plain LoRA on every target (training stage I)

    def route_request(module, args, kwargs):
        if no_routers or state._pending is None or state.fixed is not None:
            state._pending = None
            return
        input_ids, attention_mask = state._pending
        state._pending = None
        state.current = route(model, input_ids, attention_mask, kwargs["inputs_embeds"])

    model.register_forward_pre_hook(capture_request, with_kwargs=True)
    family_of_model(model).language_model(model).register_forward_pre_hook(route_request, with_kwargs=True)


def adapter_modules(model):
    """(hub module path, layer) for every adapter linear."""
    for i, layer in enumerate(decoder_layers(model)):
        for proj in (*model.awaker_config.lora_targets, *model.awaker_config.moe_targets):
            yield lm_module_path(i, proj), getattr(_linear_parent(layer, proj), proj)


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """Adapter and router tensors under their checkpoint (hub) names."""
    out = {}
    for path, module in adapter_modules(model):
        out[f"{path}.lora_A"] = module.lora_A
        out[f"{path}.lora_B"] = module.lora_B
    for name, p in model.awaker_routers.named_parameters():
        out[ROUTER_PREFIX + name] = p
    return out


def base_state_dict(model) -> dict[str, torch.Tensor]:
    """Base tensors under their hub names (tied lm_head left out, as transformers does)."""
    out = {}
    for key, t in model.state_dict().items():
        key = to_hub(key)
        if is_adapter_key(key):
            continue
        if key == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
            continue
        out[key] = t
    return out


def _silence_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_base(path: str | Path | Checkpoint, dtype: torch.dtype | None = None, device: str | None = None):
    """The plain dense model of a directory, in its family's transformers class (either key layout;
    awaker tensors are ignored)."""
    # Checkpoint validates config, shards and headers with clear errors before transformers sees them.
    ckpt = path if isinstance(path, Checkpoint) else Checkpoint(path)
    _silence_transformers()
    model = ckpt.family.load_class().from_pretrained(ckpt.weights_path, dtype=dtype or "auto", device_map=device)
    if "quantization_config" in ckpt.config:  # an `awaker export` (transformers needs accelerate for it)
        fix_bnb_model(model, dtype)
    return model.eval(), ckpt


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str | None = None):
    """An awaker directory -> the ready model (eval mode), adapters and routers loaded."""
    ckpt = Checkpoint(path)
    cfg = AwakerConfig.load(ckpt.path)
    model, _ = load_base(ckpt, dtype, device)
    attach_adapters(model, cfg)
    load_adapter_tensors(model, ckpt)
    return model.eval()


@torch.no_grad()
def load_adapter_tensors(model, ckpt: Checkpoint):
    """Copy every adapter/router tensor of the checkpoint into the model, strictly."""
    params = adapter_state_dict(model)
    stored = [k for k in ckpt.ordered_keys() if is_adapter_key(k)]
    unknown = sorted(set(stored) - set(params))
    missing = sorted(set(params) - set(stored))
    if unknown or missing:
        what = (f"unexpected {unknown[:3]}" if unknown else "") + (f" missing {missing[:3]}" if missing else "")
        raise AwakerError(f"{ckpt.path}: adapter tensors do not match awaker_config.json:{what}")
    for key in stored:
        target = params[key]
        tensor = _read_adapter(ckpt, key, tuple(target.shape))
        if tuple(tensor.shape) != tuple(target.shape):
            raise AwakerError(f"{ckpt.path}: {key} has shape {tuple(tensor.shape)}, "
                              f"awaker_config.json implies {tuple(target.shape)}")
        target.copy_(tensor.to(target.dtype))


def _read_adapter(ckpt: Checkpoint, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """An adapter tensor; `awaker export --quantize-experts` stores experts as bitsandbytes blobs
    (`key` plus `key.SCB` for int8, or `key.absmax`, `key.quant_map`, ... for 4 bit): dequantize them."""
    tensor = ckpt.get(key)
    if f"{key}.SCB" in ckpt.tensors:
        return (tensor.float() * ckpt.get(f"{key}.SCB")[:, None] / 127).reshape(shape)
    if f"{key}.absmax" in ckpt.tensors:
        from bitsandbytes.functional import QuantState, dequantize_4bit

        prefix = key + "."
        state = QuantState.from_dict({k[len(prefix):]: ckpt.get(k) for k in ckpt.tensors if k.startswith(prefix)},
                                     device=torch.device("cpu"))
        return dequantize_4bit(tensor, state).reshape(shape)
    return tensor


@torch.no_grad()
def merge_lora(model):
    """Fold every plain LoRA (q/k/v) into its base weight, for inference."""
    for _, module in adapter_modules(model):
        # A quantized base cannot absorb the delta: that LoRA stays unmerged (same output, a bit slower).
        if isinstance(module, LoRALinear) and module.base_layer is None:
            module.merge_()
