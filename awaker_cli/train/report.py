"""Where a run's metrics go besides metrics.jsonl (train.report_to): TensorBoard or Weights & Biases,
through their own libraries, optional extras (`pip install 'awaker[tensorboard]'` / `'awaker[wandb]'`).

TensorBoard event files go to OUTPUT/tensorboard (`tensorboard --logdir OUTPUT/tensorboard`); wandb runs
are named after the output directory and keep their files in OUTPUT/wandb (WANDB_MODE=offline works).
Every number of a metrics.jsonl line is logged under train/NAME or eval/NAME at its step.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import AwakerError

_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
_SKIP = {"step", "time", "epoch"}


def check_available(report_to: str) -> None:
    """Before any weights load: the library train.report_to names is installed."""
    package = _PACKAGES.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise AwakerError(f"train.report_to={report_to}: the {package} package is not installed "
                          f"(pip install 'awaker[{report_to}]', or set train.report_to=none)")


class Reporter:
    """log(record) for every metrics.jsonl record; close() at the end (also after an error)."""

    def __init__(self, report_to: str, out: Path, config: dict):
        self.kind, self.writer, self.run = report_to, None, None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        elif report_to == "wandb":
            import wandb

            (out / "wandb").mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(project="awaker", name=out.name, dir=str(out), config=config)

    def log(self, record: dict, prefix: str = "train"):
        if self.kind == "none":
            return
        step = record["step"]
        values = {f"{prefix}/{k.removeprefix('eval_')}": v for k, v in record.items()
                  if k not in _SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        if self.run is not None:
            self.run.log(values, step=step)

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.run is not None:
            self.run.finish()
            self.run = None
