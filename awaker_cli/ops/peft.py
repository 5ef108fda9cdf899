"""peft in and out: a plain LoRA of an awaker model as a peft adapter directory, and a peft LoRA adapter
as a stage-I awaker model (so stage II can start from a LoRA trained elsewhere).

Both directions are key mapping and nothing else: awaker's plain LoRA and peft's compute the same
y = W x + (alpha / r) · B A x with the same shapes (A [r, in], B [out, r]), so the tensors are copied
unchanged. peft names a module by its path in the transformers model (transformers 5:
model.language_model.layers.N…), under `base_model.model.`; awaker's checkpoints use the hub path
(model.layers.N…). Neither needs peft installed: the files are JSON and safetensors.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, atomic_output_dir, check_output_dir, missing_processor_files
from ..checkpoint.keys import lm_linear, lm_module_path, to_hub
from ..errors import AwakerError
from ..model.config import CONFIG_NAME, LINEARS, AwakerConfig
from ..model.families import family
from ..progress import no_bar
from .rewrite import open_source

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# peft matches target_modules by name suffix, and Qwen2.5-VL's vision blocks have gate/up/down_proj too:
# keep peft off the vision tower (awaker never adapts it). A string is matched as a full regex.
EXCLUDE_VISION = r".*\bvisual\b.*"


def _peft_path(hub_path: str, language_model_path: str) -> str:
    """model.layers.N.self_attn.q_proj -> base_model.model.<language model>.layers.N.self_attn.q_proj"""
    return PEFT_PREFIX + language_model_path + hub_path[len("model"):]


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


# -- out ------------------------------------------------------------------------------------------------
def export_peft(source, out, *, force: bool = False, base_model: str | None = None, bar=no_bar) -> dict:
    """Write the plain LoRA of the awaker model `source` as a peft LoRA adapter directory `out`."""
    from safetensors.torch import save_file

    ckpt, cfg = open_source(source, "export-peft")
    if cfg.moe_targets:
        raise AwakerError(f"{ckpt.path}: has routed LoRA experts on {', '.join(cfg.moe_targets)}, which a peft LoRA "
                          "cannot hold; export a stage-I (plain LoRA) model, or bake a routing into a dense model "
                          "with `awaker merge MODEL OUT --expert N`")
    if not cfg.lora_targets:
        raise AwakerError(f"{ckpt.path}: has no plain LoRA to export (lora_targets is empty)")
    check_output_dir(out, force, inputs=ckpt.input_paths)
    lm_path = family(cfg.family).language_model_path
    base = base_model or cfg.base_model or str(ckpt.path)  # an awaker directory holds its whole base
    paths = [lm_module_path(i, p) for i in range(cfg.num_layers) for p in cfg.lora_targets]
    tensors = {}
    with bar("export-peft", len(paths), unit="modules") as advance:
        for path in paths:
            for half in ("lora_A", "lora_B"):
                tensors[f"{_peft_path(path, lm_path)}.{half}.weight"] = ckpt.get(f"{path}.{half}").contiguous()
            advance(1)
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base, "revision": None,
        "r": cfg.rank, "lora_alpha": _number(cfg.alpha), "lora_dropout": cfg.dropout,
        "target_modules": [t for t in LINEARS if t in cfg.lora_targets], "exclude_modules": EXCLUDE_VISION,
        "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
    }
    with atomic_output_dir(out, force, inputs=ckpt.input_paths, what="peft adapter") as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text(
            f"# peft LoRA adapter (from awaker model `{ckpt.path.name}`)\n\n"
            f"Made by `awaker export-peft` from `{ckpt.path}`: rank {cfg.rank}, lora_alpha {_number(cfg.alpha)}, "
            f"on {', '.join(config['target_modules'])} of every language-model layer.\n\n"
            f"Base model: `{base}`. Load it with `PeftModel.from_pretrained(base, this_directory)`.\n")
    return {"source": str(ckpt.path), "output": str(out), "base_model_name_or_path": base, "r": cfg.rank,
            "lora_alpha": _number(cfg.alpha), "target_modules": config["target_modules"], "modules": len(paths),
            "parameters": sum(t.numel() for t in tensors.values())}


# -- in -------------------------------------------------------------------------------------------------
def _read_adapter_config(adapter: Path) -> dict:
    path = adapter / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise AwakerError(f"{adapter}: no {ADAPTER_CONFIG} (not a peft adapter directory)") from None
    except json.JSONDecodeError as e:
        raise AwakerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AwakerError(f"{path}: not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AwakerError(f"{adapter}: a peft {config.get('peft_type')} adapter; awaker imports LoRA adapters only")
    # what a plain LoRA of awaker cannot express
    unsupported = [(config.get("use_dora"), "DoRA (use_dora)"), (config.get("bias", "none") != "none", "bias"),
                   (config.get("lora_bias"), "lora_bias"), (config.get("modules_to_save"), "modules_to_save"),
                   (config.get("fan_in_fan_out"), "fan_in_fan_out"),
                   (config.get("target_parameters"), "target_parameters"),
                   (config.get("layer_replication"), "layer_replication"),
                   (config.get("trainable_token_indices"), "trainable_token_indices")]
    used = [name for flag, name in unsupported if flag]
    if used:
        raise AwakerError(f"{adapter}: uses {', '.join(used)}, which a plain awaker LoRA cannot hold")
    return config


def _read_adapter_tensors(adapter: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = adapter / ADAPTER_WEIGHTS
    if not file.is_file():
        also = " (adapter_model.bin is not read: save it with safe_serialization=True)" if (
            adapter / "adapter_model.bin").exists() else ""
        raise AwakerError(f"{adapter}: no {ADAPTER_WEIGHTS}{also}")
    return load_file(str(file))


def _module_of(key: str, adapter: Path) -> tuple[int, str, str]:
    """(layer, projection, lora_A|lora_B) of a peft tensor name, whichever key layout it uses."""
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    for half in ("lora_A", "lora_B"):
        for suffix in (f".{half}.weight", f".{half}.default.weight"):
            if name.endswith(suffix):
                parsed = lm_linear(to_hub(name[:-len(suffix)]) + ".weight")
                if parsed is not None:
                    return parsed[0], parsed[1], half
    raise AwakerError(f"{adapter}: tensor {key} is not a LoRA of a language-model linear "
                      f"({', '.join(LINEARS)}); awaker imports only those")


def import_peft(adapter, base, out, *, force: bool = False, bar=no_bar) -> dict:
    """Turn the peft LoRA adapter directory `adapter` (trained on `base`, a dense model directory or hub
    id) into a stage-I awaker model `out`: the base copied, the LoRA as its plain LoRA, no routers."""
    from ..model.layers import RouterBank
    from ..model.save import save_with_source_base
    from ..ops.upcycle import _span_token_ids

    adapter = Path(adapter).expanduser()
    if not adapter.is_dir():
        raise AwakerError(f"{adapter}: not a directory (a peft adapter directory holds {ADAPTER_CONFIG})")
    config = _read_adapter_config(adapter)
    ckpt = Checkpoint(base)
    if (ckpt.path / CONFIG_NAME).is_file():
        raise AwakerError(f"--base {base}: an awaker model; give the dense model the adapter was trained on")
    if missing_processor_files(ckpt.path):
        raise AwakerError(f"--base {ckpt.path}: missing processor/tokenizer files: "
                          f"{', '.join(missing_processor_files(ckpt.path))}")
    check_output_dir(out, force, inputs=[*ckpt.input_paths, adapter])
    stored = _read_adapter_tensors(adapter)
    lora: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in stored.items():
        layer, proj, half = _module_of(key, adapter)
        lora.setdefault((layer, proj), {})[half] = t
    if not lora:
        raise AwakerError(f"{adapter}: {ADAPTER_WEIGHTS} holds no LoRA tensors")
    ranks = {t.shape[0] if half == "lora_A" else t.shape[1] for pair in lora.values() for half, t in pair.items()}
    r = int(config.get("r") or 0)
    if len(ranks) != 1 or ranks != {r} or any((config.get(k) or {}) for k in ("rank_pattern", "alpha_pattern")):
        raise AwakerError(f"{adapter}: its modules have ranks {sorted(ranks)} (r {r}); awaker's LoRA has one rank "
                          "and one alpha for every module")
    alpha = float(config.get("lora_alpha", 8))
    if config.get("use_rslora"):  # peft scales by alpha/√r there; awaker by alpha/r: same product
        alpha *= math.sqrt(r)
    targets = [t for t in LINEARS if any(p == t for _, p in lora)]
    n_layers = ckpt.num_layers
    beyond = sorted({i for i, _ in lora if i >= n_layers})
    if beyond:
        raise AwakerError(f"{adapter}: adapts layer {beyond[0]}, but the base {ckpt.path} has {n_layers} layers "
                          "(is --base the model it was trained on?)")
    adapters: dict[str, torch.Tensor] = {}
    filled = 0
    generator = torch.Generator().manual_seed(0)
    with bar("import-peft", n_layers * len(targets), unit="modules") as advance:
        for i in range(n_layers):
            for proj in targets:
                path = lm_module_path(i, proj)
                out_f, in_f = ckpt.tensors[f"{path}.weight"].shape
                pair = lora.get((i, proj), {})
                if set(pair) == {"lora_A", "lora_B"}:
                    A, B = pair["lora_A"], pair["lora_B"]
                    if tuple(A.shape) != (r, in_f) or tuple(B.shape) != (out_f, r):
                        raise AwakerError(f"{adapter}: {path} has LoRA shapes A {tuple(A.shape)}, B {tuple(B.shape)}; "
                                          f"the base's weight is {out_f}x{in_f} (is --base the model it was "
                                          "trained on?)")
                elif pair:
                    raise AwakerError(f"{adapter}: {path} has only {', '.join(pair)} (a LoRA needs A and B)")
                else:  # a layer peft left out (layers_to_transform): B = 0 adds nothing, A trains in stage II
                    dtype = next(iter(stored.values())).dtype
                    A = torch.empty(r, in_f)
                    _init_lora_A_with(A, generator)
                    A, B = A.to(dtype), torch.zeros(out_f, r, dtype=dtype)
                    filled += 1
                adapters[f"{path}.lora_A"], adapters[f"{path}.lora_B"] = A, B
                advance(1)
    cfg = AwakerConfig(
        num_experts=1, top_k=1, global_expert=False, moe_targets=[], router_owners={}, rank=r, alpha=alpha,
        dropout=float(config.get("lora_dropout") or 0.0), lora_targets=targets, combine="convex",
        num_layers=n_layers, base_model=str(base), span_token_ids=_span_token_ids(ckpt), family=ckpt.family.name,
    ).validate()
    # the (empty) router bank a stage-I model carries, so the directory is exactly what `train` writes
    bank = RouterBank(0, ckpt.hidden_size, 1, eps=cfg.router_norm_eps, temperature=1.0, top_k=1, noise_std=0.0,
                      combine=cfg.combine, global_expert=False)
    for name, p in bank.named_parameters():
        adapters[f"awaker_routers.{name}"] = p.detach()
    card = [f"Made by `awaker import-peft` from the peft LoRA adapter `{adapter}` on the base `{base}`: a stage-I "
            f"awaker model (plain LoRA, rank {r}, alpha {_number(alpha)}, on {', '.join(targets)}).",
            "Continue with stage II: `awaker train stage2 init_from=THIS_DIRECTORY ...`."]
    save_with_source_base(out, ckpt, adapters, cfg, force=force, title="awaker stage-1 model (imported from peft)",
                          card=card)
    return {"adapter": str(adapter), "base": str(ckpt.path), "output": str(out), "r": r, "alpha": _number(alpha),
            "lora_targets": targets, "modules": len(lora), "modules_filled": filled,
            "awaker_config": cfg.to_dict()}


def _init_lora_A_with(t: torch.Tensor, generator: torch.Generator):
    """awaker's (and peft's) A initialisation, kaiming-uniform bounds, from a seeded generator."""
    bound = 1.0 / math.sqrt(t.shape[-1])
    t.uniform_(-bound, bound, generator=generator)
