"""`awaker train --recipe NAME [key=value ...]`: staged training (I: LoRA, II: LoRA-MoE, III: frozen gates)."""
from __future__ import annotations

import sys

import typer

from ..cli import app, print_json


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def train(
    recipe: str = typer.Option(..., "--recipe", "-r",
                               help="A shipped recipe (stage1, stage2, stage3, tiny-stage1, ...) or a YAML file."),
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...",
                                          help="Override recipe fields, dotted for sections: model=PATH "
                                               "output_dir=OUT data.train=FILE train.lr=2e-4 ..."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved recipe and exit."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary at the end."),
):
    """Train one stage from a recipe; re-run the same command to resume from the last checkpoint.

    Stage 1 trains one plain LoRA on all seven linears of a dense Qwen2-VL (`model`). Stage 2 turns it into the LoRA-MoE (`init_from` the stage-1 output) and trains experts and routers. Stage 3 (`init_from` the stage-2 output) trains the experts with the routers frozen.

    Several GPUs (or CPU processes): torchrun --nproc-per-node N -m awaker_cli train --recipe ... with train.parallel=ddp (a full copy per GPU) or fsdp (model, gradients and optimizer sharded over the GPUs; the 7B recipes' choice).
    """
    from ..train import load_recipe

    resolved = load_recipe(recipe, overrides or [])
    if print_config:
        sys.stdout.write(resolved.to_yaml())
        return
    from ..train import train as run_training

    summary = run_training(resolved)
    if json_out:
        print_json(summary)
