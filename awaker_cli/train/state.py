"""Training checkpoints: everything a run needs to continue exactly where it stopped.

`OUTPUT/checkpoints/step-NNNNNNNN/state.pt` holds the adapter and router tensors, the optimizer and
scheduler states, every process's RNG states, the data position (the step: see data.StepBatches) and
the resolved recipe. With fsdp the adapters and optimizer states are sharded over the processes: each
writes its own shard, rank-RRRRR.pt, and state.pt holds the rest. A checkpoint is assembled in a
staging directory that is renamed into place, so a run killed at any moment leaves only complete
checkpoints; every file loads with torch.load(weights_only=True).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from ..errors import AwakerError

FORMAT = 1
STATE_NAME = "state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "python": [version, list(internal), gauss],
    }


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def staging_dir(output_dir: Path, step: int) -> Path:
    """Where checkpoint `step` is assembled (by every process, with fsdp) before it is renamed into place."""
    return checkpoint_root(output_dir) / f".step-{step:08d}.partial"


def begin_checkpoint(output_dir: Path, step: int) -> Path:
    tmp = staging_dir(output_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_part(path: Path, payload: dict):
    with open(path, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())


def shard_path(checkpoint: Path, rank: int) -> Path:
    """One process's shard of the adapters and optimizer states (fsdp): only that process reads it."""
    return checkpoint / f"rank-{rank:05d}.pt"


def finish_checkpoint(output_dir: Path, step: int, payload: dict, keep: int) -> Path:
    """Write state.pt into the staged checkpoint (shards already there), rename it into place, then drop
    all but the newest `keep`. state.pt is written last, so a checkpoint with one is complete."""
    tmp, final = staging_dir(output_dir, step), checkpoint_root(output_dir) / f"step-{step:08d}"
    try:
        write_part(tmp / STATE_NAME, {"format": FORMAT, "step": step, **payload})
        (tmp / "checkpoint.json").write_text(json.dumps({"step": step, "format": FORMAT}) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (leftover .partial directories are ignored)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / STATE_NAME).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def remove_partials(output_dir: Path):
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for d in root.glob(".step-*.partial*"):
            shutil.rmtree(d, ignore_errors=True)


def _load(file: Path) -> dict:
    try:  # mmap: with many processes on one machine, the pages of a big checkpoint are shared
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a damaged file: say which, and how to go on
        raise AwakerError(f"{file}: cannot load the training checkpoint ({type(e).__name__}: {e}); "
                          "delete that directory to resume from the one before")


def load_checkpoint(path: Path) -> dict:
    state = _load(path / STATE_NAME)
    if state.get("format") != FORMAT:
        raise AwakerError(f"{path / STATE_NAME}: checkpoint format {state.get('format')} is not supported")
    return state


def load_shard(path: Path, rank: int) -> dict:
    file = shard_path(path, rank)
    if not file.is_file():
        raise AwakerError(f"{file}: missing (the checkpoint was written by a different number of processes, "
                          "or is damaged)")
    return _load(file)
