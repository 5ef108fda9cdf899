"""Write the synthetic multi-task dataset: train.jsonl and test.jsonl in the training data format, one
PNG per record under img/<split>/, paths relative to the JSONL. Train and test images come from
disjoint seed streams ("synth/<seed>/train/<i>" vs "synth/<seed>/test/<i>"), so no test image is
ever a training image."""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from ..checkpoint import atomic_output_dir
from ..errors import AwakerError
from .images import make_image
from .tasks import TASKS, task_record

SPLITS = ("train", "test")


def image_seed(seed: int, split: str, index: int) -> str:
    return f"synth/{seed}/{split}/{index}"


def split_records(split: str, n: int, seed: int, tasks: Sequence[str]):
    """Yield (record, image) for one split; tasks cycle so every task gets n/len(tasks) records."""
    for i in range(n):
        image, scene = make_image(image_seed(seed, split, i))
        yield task_record(tasks[i % len(tasks)], scene, f"img/{split}/{i:06d}.png"), image


def write_dataset(out_dir: str | Path, n_train: int, n_test: int, seed: int = 0, *,
                  tasks: Sequence[str] | None = None, force: bool = False,
                  progress: Callable[[int], None] | None = None) -> dict:
    """Write OUT/train.jsonl, OUT/test.jsonl and OUT/img/ atomically; return their paths and counts."""
    tasks = list(tasks or TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise AwakerError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    if n_train < 0 or n_test < 0 or n_train + n_test == 0:
        raise AwakerError("--train and --test must be >= 0 and not both 0")
    out = Path(out_dir)
    counts = {"train": n_train, "test": n_test}
    with atomic_output_dir(out, force) as tmp:
        for split, n in counts.items():
            (tmp / "img" / split).mkdir(parents=True)
            with open(tmp / f"{split}.jsonl", "w") as f:
                for record, image in split_records(split, n, seed, tasks):
                    image.save(tmp / record["images"][0], format="PNG")
                    f.write(json.dumps(record) + "\n")
                    if progress:
                        progress(1)
    return {"out": str(out.resolve()), "train": str(out.resolve() / "train.jsonl"),
            "test": str(out.resolve() / "test.jsonl"), "n_train": n_train, "n_test": n_test,
            "seed": seed, "tasks": tasks}
