"""`awaker export`: a shippable copy of an awaker (or baked dense) model, its language-model linear
weights quantized with bitsandbytes (nf4 / fp4 / int8) in the layout transformers reads, everything else
cast to bf16 or fp16. Vision tower and lm_head stay unquantized; LoRA experts stay in the float dtype
unless asked (QLoRA keeps them so too).

The quantized tensors are made by bitsandbytes itself: each weight goes through a Linear4bit /
Linear8bitLt moved to the CPU (which quantizes it) and that layer's state_dict() is what is written:
`m.weight` (packed), `m.weight.absmax`, `m.weight.quant_map`, (`m.weight.nested_*`),
`m.weight.quant_state.bitsandbytes__nf4` for 4 bit; `m.weight`, `m.SCB`, `m.weight_format` for 8 bit.
"""
from __future__ import annotations

import math

import torch

from ..checkpoint import DEFAULT_SHARD_SIZE
from ..checkpoint.keys import ROUTER_PREFIX
from ..errors import AwakerError
from ..progress import no_bar
from .records import read_records
from .rewrite import check_target, measure, open_source, stream, write_output

METHODS = ("nf4", "fp4", "int8", "none")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# transformers 5 matches skip names from the start at a dot boundary or as a suffix of the in-memory
# module name: "visual" alone would not skip "model.visual.…" (docs/design.md section 4).
SKIP_MODULES = ["lm_head", "visual", "model.visual"]


def quantize_weight(W: torch.Tensor, method: str, *, double_quant: bool, dtype: torch.dtype,
                    device: str = "cpu") -> dict[str, torch.Tensor]:
    """The state_dict bitsandbytes writes for a Linear holding W ([out, in]), without its bias.
    device: where bitsandbytes quantizes (a GPU is much faster than the CPU at 4 bit); the result is on the CPU."""
    import bitsandbytes as bnb

    out_features, in_features = W.shape
    if method == "int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(W.to(dtype), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=dtype,
                                  compress_statistics=double_quant, quant_type=method, quant_storage=torch.uint8)
        layer.weight = bnb.nn.Params4bit(W.to(dtype), requires_grad=False, compress_statistics=double_quant,
                                         quant_type=method, quant_storage=torch.uint8)
    layer = layer.to(device)  # moving the weight to a device is what quantizes it
    return {k: v.detach().cpu() for k, v in layer.state_dict().items()}


def quantize_expert(t: torch.Tensor, method: str, *, double_quant: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A stacked expert tensor ([slots, a, b]) as bitsandbytes stores a weight, keyed by suffix ("" for the
    data itself): 4 bit blockwise with its quant state, or int8 with one scale per row (SCB). awaker's
    loader dequantizes it back to `dtype`; transformers ignores these tensors."""
    import bitsandbytes as bnb

    flat = t.reshape(-1, t.shape[-1]).to(dtype)
    if method == "int8":
        p = bnb.nn.Int8Params(flat, requires_grad=False, has_fp16_weights=False).to("cpu")
        return {"": p.data, ".SCB": p.SCB}
    p = bnb.nn.Params4bit(flat, requires_grad=False, quant_type=method, compress_statistics=double_quant,
                          quant_storage=torch.uint8).to("cpu")
    return {"": p.data, **{"." + k: v for k, v in p.quant_state.as_dict(packed=True).items()}}


def quantization_config(method: str, double_quant: bool, dtype: torch.dtype, skip=SKIP_MODULES) -> dict:
    """bitsandbytes' config for transformers; skip: the modules left in full precision (the family's)."""
    from transformers import BitsAndBytesConfig

    skip = list(skip)
    if method == "int8":
        # Threshold 0: plain int8 products (per-row absmax scales). bitsandbytes 0.50's default outlier
        # threshold 6.0 asks `outliers.any()` on the host in every linear call, which makes the decode
        # step impossible to capture as a CUDA graph (the engine then decodes eagerly, and says so).
        cfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0, llm_int8_skip_modules=skip)
    else:
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method, bnb_4bit_use_double_quant=double_quant,
                                 bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip)
    return cfg.to_dict()


def _bf16_bytes(info) -> int:
    """What a tensor takes in a bf16 model (floats at 2 bytes, other dtypes as they are)."""
    return info.numel * 2 if info.dtype.is_floating_point else info.nbytes


def export(source, out, *, quantize: str = "nf4", double_quant: bool = False, dtype: str = "bf16",
           quantize_experts: bool = False, data=None, batch_size: int = 4, limit: int | None = None, force=False,
           dry_run=False, max_shard_size=DEFAULT_SHARD_SIZE, bar=no_bar) -> dict:
    if quantize not in METHODS:
        raise AwakerError(f"--quantize must be one of {', '.join(METHODS)}, got {quantize!r}")
    if dtype not in DTYPES:
        raise AwakerError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if double_quant and quantize not in ("nf4", "fp4"):
        raise AwakerError("--double-quant applies to 4-bit exports (nf4, fp4)")
    if quantize_experts and quantize == "none":
        raise AwakerError("--quantize-experts needs --quantize nf4, fp4 or int8")
    ckpt, cfg = open_source(source, "export", awaker=False)
    if not dry_run:
        check_target(ckpt, out, force, data)
    torch_dtype = DTYPES[dtype]
    linear_keys = [k for k in ckpt.tensors if _is_lm_linear_weight(k)]
    base_bf16 = sum(_bf16_bytes(ckpt.tensors[k]) for k in linear_keys)
    model_bf16 = sum(_bf16_bytes(i) for i in ckpt.tensors.values())
    if quantize_experts and cfg is None:
        raise AwakerError(f"{ckpt.path}: has no experts to quantize (a dense model)")
    summary = {"source": str(ckpt.path), "output": str(out), "kind": "awaker" if cfg else ckpt.family.label.lower(),
               "quantize": quantize, "double_quant": double_quant, "dtype": dtype,
               "quantize_experts": quantize_experts, "quantized_modules": len(linear_keys) if quantize != "none" else 0,
               "bf16_model_bytes": model_bf16, "bf16_linear_bytes": base_bf16}
    if dry_run:
        # 4 bit: half a byte per weight + an absmax per block of 64 (fp32, or 1 byte with double quant);
        # int8: a byte per weight (+ a row scale, ignored here).
        per = 1.0 if quantize == "int8" else 2.0 if quantize == "none" else 0.5 + (1 if double_quant else 4) / 64
        estimate = sum(math.ceil(ckpt.tensors[k].numel * per) for k in linear_keys)
        summary["estimated_linear_bytes"] = estimate
        summary["estimated_bytes"] = model_bf16 - base_bf16 + estimate
        return summary

    records = read_records(data, limit) if data is not None else None
    before = measure(ckpt.path, records, batch_size=batch_size, bar=bar, what="source") if records else None
    quantized_bytes = 0
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def weight(path, W):
        nonlocal quantized_bytes
        if quantize == "none":
            return None
        tensors = [(f"{path}.{k}", v) for k, v in quantize_weight(W, quantize, double_quant=double_quant,
                                                                  dtype=torch_dtype, device=device).items()]
        quantized_bytes += sum(t.numel() * t.element_size() for _, t in tensors)
        return tensors

    def cast(key, t):
        return [(key, t.to(torch_dtype) if t.is_floating_point() else t)]

    def adapter(path, A, B):
        if not (quantize_experts and A.dim() == 3):  # plain LoRA (q/k/v) and, by default, experts: float
            return cast(path + ".lora_A", A) + cast(path + ".lora_B", B)
        return [(f"{path}.{name}{suffix}", v) for name, t in (("lora_A", A), ("lora_B", B))
                for suffix, v in quantize_expert(t, quantize, double_quant=double_quant, dtype=torch_dtype).items()]

    config = dict(ckpt.config)
    config["dtype"] = str(torch_dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    if quantize != "none":
        config["quantization_config"] = quantization_config(quantize, double_quant, torch_dtype,
                                                            ckpt.family.quantize_skip)
    card = [f"Made by `awaker export` from `{ckpt.path}`: language-model linear weights "
            + (f"quantized with bitsandbytes ({quantize}{', double quant' if double_quant else ''})"
               if quantize != "none" else f"in {dtype}")
            + f"; vision tower, lm_head, embeddings, norms{', LoRA and routers' if cfg else ''} in {dtype}"
            + (f"; LoRA experts quantized the same way (dequantized to {dtype} when loaded)." if quantize_experts
               else "."),
            "Loads with transformers (bitsandbytes and accelerate installed)" + (" and with awaker." if cfg else ".")]
    with bar("export", ckpt.total_bytes) as advance:
        tensors = stream(ckpt, weight=weight, adapter=adapter,
                         routers=lambda bank: [x for k, v in bank.items() for x in cast(ROUTER_PREFIX + k, v)],
                         other=cast, progress=advance)
        summary.update(write_output(out, ckpt, tensors, force=force, awaker_config=cfg, config_json=config,
                                    max_shard_size=max_shard_size, card=card,
                                    title=f"awaker export ({quantize if quantize != 'none' else dtype})"))
    summary["linear_bytes"] = quantized_bytes if quantize != "none" else base_bf16
    summary["linear_ratio"] = summary["linear_bytes"] / base_bf16 if base_bf16 else 1.0
    summary["size_ratio"] = summary["size_on_disk"] / model_bf16
    if records:
        after = measure(out, records, batch_size=batch_size, bar=bar, what="export")
        summary.update(loss_before=before.loss, loss_after=after.loss, loss_change=after.loss - before.loss,
                       token_agreement=before.agreement(after))
        if before.expert_ids is not None:
            summary["routing_agreement"] = float((before.expert_ids == after.expert_ids).float().mean())
    return summary


def _is_lm_linear_weight(key: str) -> bool:
    from ..checkpoint.keys import lm_linear

    parsed = lm_linear(key)
    return parsed is not None and parsed[2] == "weight"

