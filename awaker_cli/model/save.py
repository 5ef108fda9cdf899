"""Write a loaded awaker model back to disk: base tensors under hub names, adapters stacked, the
processor files and config.json of the directory it came from, a model card. Atomic and sharded."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..checkpoint import (DEFAULT_SHARD_SIZE, Checkpoint, Entry, atomic_output_dir, copy_processor_files,
                          write_checkpoint, write_model_card)
from ..checkpoint.base_ref import base_record, bytes_to_hash, recorded_base, write_adapter_only
from ..errors import AwakerError
from ..progress import no_bar
from .build import adapter_state_dict, base_state_dict
from .config import AwakerConfig
from .families import family_of_model


def write_tensors(directory: Path, tensors: dict[str, torch.Tensor],
                  max_shard_size: int = DEFAULT_SHARD_SIZE, key_map=None) -> list[str]:
    """Write `tensors` into sharded safetensors inside `directory`, one at a time (names as given, or
    through key_map: a family's disk_key)."""
    return write_checkpoint(Path(directory), [Entry.of(k, t) for k, t in tensors.items()], max_shard_size,
                            key_map=key_map)


def save_model(model, out: str | Path, source: str | Path, *, force: bool = False, title: str = "awaker model",
               card: list[str] = (), max_shard_size: int = DEFAULT_SHARD_SIZE, config_json: dict | None = None,
               adapter_dtype: torch.dtype | None = None) -> Path:
    """Save `model` (base + adapters + routers) to `out`.

    source: the directory the model was loaded from (its config.json and processor files are copied).
    config_json: a replacement config.json (e.g. with quantization_config); default the source's.
    adapter_dtype: cast adapters/routers on the way out (default: as they are in memory).
    """
    source, out = Path(source), Path(out)
    if any(getattr(m, "merged", False) for m in model.modules()):
        # The base weights already hold the q/k/v deltas: saving them beside the LoRA would apply it twice.
        raise AwakerError("this model's q/k/v LoRA is merged into its base weights (inference only); "
                          "save the model before merging it")
    with atomic_output_dir(out, force, inputs=[source, *recorded_base(source)]) as tmp:
        tensors = dict(base_state_dict(model))
        adapters = adapter_state_dict(model) if hasattr(model, "awaker_config") else {}
        for key, t in adapters.items():
            tensors[key] = t.to(adapter_dtype) if adapter_dtype else t
        write_tensors(tmp, tensors, max_shard_size, key_map=family_of_model(model).disk_key)
        if config_json is not None:
            (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        else:
            shutil.copy2(source / "config.json", tmp / "config.json")
        if adapters:
            model.awaker_config.save(tmp)
        copy_processor_files(source, tmp)
        write_model_card(tmp, title, list(card), source=source)
    return out


def save_with_source_base(out: str | Path, source: Checkpoint, adapters: dict[str, torch.Tensor],
                          config: AwakerConfig, *, force: bool = False, title: str = "awaker model",
                          card: list[str] = (), max_shard_size: int = DEFAULT_SHARD_SIZE,
                          adapter_dtype: torch.dtype | None = None, adapter_only: bool = False,
                          final_dir: str | Path | None = None, bar=no_bar) -> Path:
    """Save a model whose base is `source`'s, unchanged (training freezes it): the base tensors are
    copied byte for byte from source's files, the adapters and routers come from `adapters`.
    adapter_only: write the adapters alone and a record of source's base instead (checkpoint/base_ref.py);
    final_dir: where the files will end up when `out` is only a staging place (the record's relative path);
    bar(description, total_bytes): a progress context (awaker_cli.progress.progress_bar) over the bytes
    copied, written and hashed."""
    out = Path(out)
    entries = [Entry.of(key, t.to(adapter_dtype) if adapter_dtype else t) for key, t in adapters.items()]
    if not adapter_only:
        base = source.base_tensors()
        entries = [Entry(key, base[key].dtype, base[key].shape, source=base[key])
                   for key in source.ordered_keys() if key in base] + entries
    total = sum(e.nbytes for e in entries) + (bytes_to_hash(source) if adapter_only else 0)
    with bar("saving", total) as advance:
        # the base is hashed once, before the output exists
        record = base_record(source, Path(final_dir or out), advance) if adapter_only else None
        with atomic_output_dir(out, force, inputs=source.input_paths) as tmp:
            if adapter_only:
                write_adapter_only(tmp, entries, record, source.family.disk_key, advance)
            else:
                write_checkpoint(tmp, entries, max_shard_size, advance, key_map=source.family.disk_key)
            shutil.copy2(source.path / "config.json", tmp / "config.json")
            config.save(tmp)
            copy_processor_files(source.path, tmp)
            write_model_card(tmp, title, list(card), source=source.path)
    return out
