"""`awaker pretrain-tiny OUT`: reproduce the tiny pretrained base shipped in awaker_cli/assets/tiny-base."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from ..cli import app, print_json
from ..errors import AwakerError
from ..progress import progress_bar, stderr


@app.command("pretrain-tiny")
def pretrain_tiny(
    out: Path = typer.Argument(..., help="Directory to write the pretrained tiny Qwen2-VL to."),
    steps: int = typer.Option(800, help="Optimizer steps."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per step."),
    lr: float = typer.Option(2e-3, help="Peak learning rate (warmup, then cosine to a tenth)."),
    seed: int = typer.Option(0, help="Seed of the weights and of the image stream."),
    eval_samples: int = typer.Option(128, "--eval-samples", help="Held-out images per question kind for the final accuracy."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Train a tiny Qwen2-VL (vision tower included) from scratch on CPU, on neutral descriptions of
    synthetic images ("There are 3 squares.", "They are red."), until it sees colours, counts, shapes
    and digits. This is how awaker_cli/assets/tiny-base was made (the defaults reproduce it)."""
    from ..checkpoint import check_output_dir
    from ..synth.pretrain import pretrain

    if steps < 1 or batch_size < 1:
        raise AwakerError("--steps and --batch-size must be at least 1")
    check_output_dir(out, force)
    with progress_bar("pretrain", steps, unit="steps", enabled=not json_out) as advance:
        result = pretrain(out, steps=steps, batch_size=batch_size, lr=lr, seed=seed, eval_samples=eval_samples,
                          force=force, progress=advance)
    if json_out:
        return print_json(result)
    acc = ", ".join(f"{k} {100 * v:.0f}%" for k, v in result["accuracy"].items())
    stderr.print(f"[green]wrote[/] {escape(str(out))} ({result['parameters']:,} parameters, {result['train_seconds']:.0f}s; "
                 f"held-out accuracy: {acc})")
