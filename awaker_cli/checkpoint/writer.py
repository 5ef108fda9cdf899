"""Write checkpoints safely: sharded safetensors streamed tensor by tensor, inside a temporary sibling
directory that is renamed into place only when everything is written."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import AwakerError
from .reader import INDEX_NAME, SINGLE_NAME

DEFAULT_SHARD_SIZE = 5 * 1000**3


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a plain number of bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper()
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "B": 1}
    for unit, factor in units.items():
        if s.endswith(unit):
            number = s[: -len(unit)].strip()
            break
    else:
        number, factor = s, 1
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise AwakerError(f"cannot read size {text!r} (use bytes, or a number with KB/MB/GB/GiB)")
    if value <= 0:
        raise AwakerError(f"size must be positive, got {text!r}")
    return value


class ShardWriter:
    """Buffers tensors up to max_shard_size bytes, then writes a shard; peak memory is one shard."""

    def __init__(self, directory: Path, max_shard_size: int = DEFAULT_SHARD_SIZE):
        self.directory = Path(directory)
        self.max_shard_size = max_shard_size
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []  # keys per written shard, in order
        self._seen: set[str] = set()
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor):
        if key in self._seen:
            raise ValueError(f"duplicate tensor {key}")
        self._seen.add(key)
        n = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + n > self.max_shard_size:
            self._flush()
        self._buffer[key] = tensor.contiguous()
        self._buffer_bytes += n
        self.total_bytes += n

    def _flush(self):
        name = self._temp_name(len(self._shards))
        save_file(self._buffer, str(self.directory / name), metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    @staticmethod
    def _temp_name(i: int) -> str:
        return f"shard-{i:05d}.partial"

    def close(self) -> list[str]:
        """Write the last shard, give shards their final names and write the index (if sharded)."""
        if self._buffer or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            os.replace(self.directory / self._temp_name(0), self.directory / SINGLE_NAME)
            return [SINGLE_NAME]
        names, weight_map = [], {}
        for i, keys in enumerate(self._shards):
            name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.directory / self._temp_name(i), self.directory / name)
            names.append(name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return names


def check_output_dir(out: Path, force: bool):
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise AwakerError(f"{out}: already exists and is not empty (use --force to replace it)")


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, force: bool = False):
    """Yield a temporary sibling directory; on success it replaces `out`, on any error it is removed,
    so `out` is either untouched or complete."""
    out = Path(out).resolve()
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
