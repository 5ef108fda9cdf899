"""Pictures of a training run and of a model's routing, drawn with matplotlib (Agg: no display needed).

loss_plot: train loss (and eval loss) over the optimizer steps, the learning rate on a second axis.
routing_plot: the share of router decisions each expert gets, one heatmap per router group (the MoE
targets that own a router), layers down, experts across, one colour bar for all.

Both write a PNG of a fixed pixel size (LOSS_SIZE, ROUTING_SIZE) atomically (temp file + rename), so a
half-written picture never sits next to metrics.jsonl.
"""
from __future__ import annotations

import os
from pathlib import Path

LOSS_SIZE = (1000, 500)  # pixels (width, height)
ROUTING_SIZE = (1000, 600)
_DPI = 100
SOFTWARE = "awaker"


def is_awaker_plot(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.info.get("Software") == SOFTWARE
    except OSError:
        return False


def check_plot_target(path: str | Path, force: bool, inputs=()) -> None:
    """Before any work: PATH is new, or (with --force) a picture awaker drew, and no input."""
    from .checkpoint.outputs import check_not_an_input
    from .errors import AwakerError

    path = Path(path)
    check_not_an_input(path, inputs)
    if path.suffix.lower() != ".png":
        raise AwakerError(f"{path}: the plot is a PNG file; give a name ending in .png")
    if not path.parent.is_dir():
        raise AwakerError(f"{path}: the directory {path.parent} does not exist")
    if path.exists():
        if not force:
            raise AwakerError(f"{path}: already exists (use --force to replace a plot awaker drew)")
        if not is_awaker_plot(path):
            raise AwakerError(f"{path}: is not a plot awaker drew; --force replaces only those: choose another name")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only; never a window, also without $DISPLAY
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    # no bbox_inches="tight": the size stays what LOSS_SIZE says; the Software tag lets --force know its own
    fig.savefig(tmp, dpi=_DPI, format="png", metadata={"Software": SOFTWARE})
    os.replace(tmp, path)
    return path


def loss_plot(metrics: list[dict], path: str | Path, title: str = "training") -> Path:
    """metrics: metrics.jsonl's records. Train records carry `loss` and `lr`, eval records `eval_loss`."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_loss" in m]
    fig, ax = plt.subplots(figsize=(LOSS_SIZE[0] / _DPI, LOSS_SIZE[1] / _DPI), dpi=_DPI)
    try:
        lines = []
        if train:
            lines += ax.plot([m["step"] for m in train], [m["loss"] for m in train], color="tab:blue",
                             marker="." if len(train) < 50 else None, label="train loss")
        if evals:
            lines += ax.plot([m["step"] for m in evals], [m["eval_loss"] for m in evals], color="tab:orange",
                             marker="o", label="eval loss")
            best = min(evals, key=lambda m: m["eval_loss"])
            lines += ax.plot([best["step"]], [best["eval_loss"]], linestyle="none", marker="*", markersize=14,
                             color="tab:red", label=f"best eval (step {best['step']})")
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss (mean token cross-entropy)")
        ax.grid(alpha=0.3)
        with_lr = [m for m in train if "lr" in m]
        if with_lr:
            ax2 = ax.twinx()
            lines += ax2.plot([m["step"] for m in with_lr], [m["lr"] for m in with_lr], color="tab:green",
                              linestyle="--", alpha=0.8, label="learning rate")
            ax2.set_ylabel("learning rate")
            ax2.set_ylim(bottom=0)
            ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        if lines:  # below the axes: never over the curves
            ax.legend(lines, [line.get_label() for line in lines], loc="upper center", bbox_to_anchor=(0.5, -0.13),
                      ncol=len(lines), frameon=False)
        ax.set_title(title)
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def routing_plot(share, groups: list[str], path: str | Path, title: str = "routing") -> Path:
    """share: [layers, groups, experts] (array-like) shares of the router decisions of each router;
    groups: the names of the router groups (AwakerConfig.router_names)."""
    import numpy as np

    plt = _pyplot()
    share = np.asarray(share, dtype=float)
    layers, n_groups, experts = share.shape
    fig, axes = plt.subplots(1, n_groups, figsize=(ROUTING_SIZE[0] / _DPI, ROUTING_SIZE[1] / _DPI), dpi=_DPI,
                             squeeze=False, sharey=True)
    try:
        vmax = max(float(share.max()), 1e-9)
        image = None
        for g, ax in enumerate(axes[0]):
            image = ax.imshow(share[:, g, :], aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax,
                              interpolation="nearest")
            ax.set_title(f"router of {groups[g]}")
            ax.set_xlabel("expert")
            ax.set_xticks(range(experts))
            step = max(1, layers // 16)  # a readable number of layer ticks on deep models
            ax.set_yticks(range(0, layers, step))
            if layers * experts <= 160:  # few cells: print the share in each
                for i in range(layers):
                    for e in range(experts):
                        v = share[i, g, e]
                        ax.text(e, i, f"{v:.0%}", ha="center", va="center", fontsize=8,
                                color="black" if v > 0.6 * vmax else "white")
        axes[0][0].set_ylabel("layer")
        fig.suptitle(title)
        fig.tight_layout(rect=(0, 0, 0.9, 1))
        cax = fig.add_axes((0.92, 0.12, 0.02, 0.76))
        bar = fig.colorbar(image, cax=cax)
        bar.set_label("share of the router's decisions")
        return _save(fig, path)
    finally:
        plt.close(fig)


def share_by_layer(counts, num_groups: int):
    """[R, E] decision counts per router (router r = layer r // G, group r % G) -> [layers, G, E] shares."""
    import numpy as np

    counts = np.asarray(counts, dtype=float)
    totals = counts.sum(-1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    return share.reshape(-1, num_groups, counts.shape[-1])
