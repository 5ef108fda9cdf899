"""Adapter-only awaker directories: the adapters and routers alone, plus a record of the base they were
trained on (where it is and a content hash of its tensors), so that a run does not copy 16 GB of frozen
base weights into every stage.

    awaker_adapters.safetensors   adapter and router tensors (hub names, as in a complete directory)
    awaker_base.json              {"path", "relative", "hub_id", "tensors_sha256", ...}

`Checkpoint` opens such a directory as if it were complete: it finds the base (the recorded path, the
same path relative to the directory, then the hub id in the local cache), verifies it, and serves the
base's tensors beside the adapters. The content hash covers every base tensor's hub name, dtype, shape
and bytes, so a re-sharded copy or the other key layout of the same weights verifies; a re-hash (about
as long as reading the base once) is only needed when the base's files are not exactly the recorded
ones (same names, sizes and modification times).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import AwakerError
from ..progress import no_bar

BASE_FILE = "awaker_base.json"
ADAPTERS_FILE = "awaker_adapters.safetensors"
FORMAT = 1
_CHUNK = 16 << 20


def is_adapter_only(directory: str | Path) -> bool:
    return (Path(directory) / BASE_FILE).is_file()


def _tensor_digest(info) -> bytes:
    h = hashlib.sha256()
    with open(info.file, "rb") as f:
        f.seek(info.offset)
        left = info.nbytes
        while left:
            chunk = f.read(min(left, _CHUNK))
            if not chunk:
                raise AwakerError(f"{info.file}: truncated while hashing {info.name!r}")
            h.update(chunk)  # hashlib releases the GIL on large buffers: tensors hash in parallel
            left -= len(chunk)
    return h.digest()


def tensors_sha256(tensors: dict, progress: Callable[[int], None] | None = None) -> str:
    """The content hash of a set of tensors {hub key: TensorInfo}: independent of sharding and key layout.
    progress(n_bytes) is called as each tensor is hashed (from the hashing threads)."""
    keys = sorted(tensors)

    def digest(key):
        d = _tensor_digest(tensors[key])
        if progress is not None:
            progress(tensors[key].nbytes)
        return d

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(digest, keys))
    h = hashlib.sha256()
    for key, digest in zip(keys, digests):
        info = tensors[key]
        h.update(f"{key}\0{str(info.dtype).removeprefix('torch.')}\0{list(info.shape)}\0".encode())
        h.update(digest)
    return h.hexdigest()


def _file_stats(files) -> dict[str, list[int]]:
    out = {}
    for f in files:
        st = os.stat(f)  # follows the hub cache's symlinks to the blobs
        out[Path(f).name] = [st.st_size, st.st_mtime_ns]
    return out


def base_record(base, out: Path, progress: Callable[[int], None] | None = None) -> dict:
    """What an adapter-only directory written to `out` records about `base` (a Checkpoint whose base
    tensors the adapters were trained on). A base that is itself adapter-only passes its record on, with
    the place its base was found at; otherwise its tensors are hashed (progress(n_bytes) follows)."""
    if base.base is not None:
        return _located(base.base_record, base.base, out)
    tensors = base.base_tensors()
    record = {"format": FORMAT, "tensors_sha256": tensors_sha256(tensors, progress), "tensors": len(tensors),
              "bytes": sum(i.nbytes for i in tensors.values())}
    return _located(record, base, out)


def _located(record: dict, base, out: Path) -> dict:
    """`record` with the place of `base` (a Checkpoint known to hold the recorded tensors), as seen from a
    directory at `out`: its path, the path relative to `out`, its hub id and its files' sizes and times."""
    from .files import hub_id

    path = base.path.resolve()
    return {**record, "path": str(path), "hub_id": hub_id(path) or record.get("hub_id"),
            "files": _file_stats(base.files), "relative": os.path.relpath(path, Path(out).expanduser().resolve())}


def bytes_to_hash(base) -> int:
    """What base_record(base, ...) reads to hash: the base tensors' bytes, none for an adapter-only base."""
    return 0 if base.base is not None else base.base_bytes


def write_adapter_only(directory: Path, entries, record: dict, key_map=None,
                       progress: Callable[[int], None] | None = None) -> list[str]:
    """The two files of an adapter-only directory: every adapter and router tensor (checkpoint Entry
    objects) in one unsharded file, and the base record. Returns the weight file names."""
    from .writer import write_checkpoint

    names = write_checkpoint(directory, entries, 1 << 62, progress, key_map=key_map, single_name=ADAPTERS_FILE)
    write_base_record(directory, record)
    return names


def write_base_record(directory: Path, record: dict) -> None:
    tmp = directory / (BASE_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, directory / BASE_FILE)


def read_base_record(directory: Path) -> dict:
    path = directory / BASE_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or not record.get("path") or not record.get("tensors_sha256"):
            raise ValueError
    except (OSError, ValueError, UnicodeDecodeError):
        raise AwakerError(f"{path}: not a valid base record (needs path and tensors_sha256)")
    if record.get("format", FORMAT) > FORMAT:
        raise AwakerError(f"{path}: written by a newer awaker (format {record['format']}); upgrade awaker")
    return record


def _candidates(directory: Path, record: dict) -> list[Path]:
    from .reader import resolve_path

    found = []
    for p in (record["path"], directory / record["relative"] if record.get("relative") else None):
        if p is not None and Path(p).is_dir():
            found.append(Path(p).resolve())
    if record.get("hub_id"):
        try:
            found.append(resolve_path(record["hub_id"]).resolve())
        except AwakerError:
            pass
    return list(dict.fromkeys(found))


def open_base(directory: Path, record: dict):
    """The verified base Checkpoint of an adapter-only directory, or an AwakerError saying what is wrong."""
    from .reader import Checkpoint

    fix = ("restore the original base there (the adapters were trained on exactly those weights), or point the "
           f"directory at a copy of it with `awaker relink {directory} BASE`")
    candidates = _candidates(directory, record)
    if not candidates:
        where = record["path"]
        if record.get("hub_id"):
            where += f" (nor the hub id {record['hub_id']} in the local cache)"
        raise AwakerError(f"{directory}: its base model is gone: no directory {where}; {fix}")
    changed = None
    for path in candidates:
        base = Checkpoint(path)
        if base.base is not None:
            raise AwakerError(f"{directory}: its base {path} is itself adapter-only; {fix}")
        if verify(base, record):
            return base
        changed = path
    raise AwakerError(f"{directory}: its base {changed} has changed since the adapters were made (the content hash "
                      f"of its tensors differs from the one in {BASE_FILE}); {fix}")


def relink(directory: str | Path, new_base: str | Path, bar=no_bar) -> dict:
    """Point an adapter-only directory at another copy of its base (moved, re-sharded, or in the other key
    layout): the copy's tensors must hash to the recorded value. awaker_base.json is replaced atomically;
    returns the new record. bar(description, total_bytes): a progress context over the hashing."""
    from .reader import Checkpoint

    directory = Path(directory)
    if not is_adapter_only(directory):
        raise AwakerError(f"{directory}: not an adapter-only awaker directory (it has no {BASE_FILE}); "
                          "a complete directory holds its base and needs no relinking")
    record = read_base_record(directory)
    base = Checkpoint(new_base)
    if base.base is not None:
        raise AwakerError(f"{new_base}: is itself adapter-only; give the complete base model")
    with bar("hashing the base", bytes_to_hash(base)) as advance:
        digest = tensors_sha256(base.base_tensors(), advance)
    if digest != record["tensors_sha256"]:
        raise AwakerError(f"{new_base}: its tensors are not the ones {directory} was trained on (their content hash "
                          f"differs from the one in {BASE_FILE}); give a copy of the original base")
    new = _located(record, base, directory)
    write_base_record(directory, new)
    return new


def verify(base, record: dict) -> bool:
    """True when `base` holds exactly the recorded base tensors. Unchanged files (names, sizes and
    modification times as recorded) are taken as they are; anything else is re-hashed."""
    if str(base.path.resolve()) == record["path"] and _file_stats(base.files) == record.get("files"):
        return True
    return tensors_sha256(base.base_tensors()) == record["tensors_sha256"]


def recorded_base(directory: str | Path) -> list[Path]:
    """The base path an adapter-only directory records (empty for any other directory): an input that
    no output may replace."""
    directory = Path(directory)
    if not is_adapter_only(directory):
        return []
    try:
        return [Path(read_base_record(directory)["path"])]
    except AwakerError:
        return []
