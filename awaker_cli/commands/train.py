"""`awaker train RECIPE [key=value ...]` (or `--recipe RECIPE`): staged training (I: LoRA, II: LoRA-MoE,
III: frozen gates)."""
from __future__ import annotations

import sys

import typer

from ..cli import app, print_json
from ..errors import AwakerError


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def train(
    args: list[str] = typer.Argument(None, metavar="[RECIPE] [KEY=VALUE]...",
                                     help="The recipe (as `llamafactory-cli train cfg.yaml` takes it; or use "
                                          "--recipe), then overrides of its fields, dotted for sections: "
                                          "model=PATH output_dir=OUT data.train=FILE train.lr=2e-4 ..."),
    recipe: str | None = typer.Option(None, "--recipe", "-r",
                                      help="A shipped recipe (stage1, stage2, stage3, tiny-stage1, ...) or a YAML file."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved recipe and exit."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary at the end."),
    full: bool = typer.Option(False, "--full",
                              help="Write a complete model (a copy of the base beside the adapters). Default: "
                                   "adapters only, with a record of the base that every command finds and "
                                   "verifies."),
    recipe_schema: bool = typer.Option(False, "--recipe-schema",
                                       help="Print the recipes' JSON schema (for editors: `awaker train "
                                            "--recipe-schema > recipe.schema.json`) and exit."),
):
    """Train one stage from a recipe; re-run the same command to resume from the last checkpoint.

    awaker train stage1 model=Qwen/Qwen2-VL-7B-Instruct output_dir=out/stage1 data.train=data.json

    Stage 1 trains one plain LoRA on all seven linears of a dense Qwen2-VL, Qwen2.5-VL or Qwen3-VL (`model`). Stage 2 turns it into the LoRA-MoE (`init_from` the stage-1 output) and trains experts and routers. Stage 3 (`init_from` the stage-2 output) trains the experts with the routers frozen.

    Several GPUs (or CPU processes): torchrun --nproc-per-node N -m awaker_cli train --recipe ... with train.parallel=ddp (a full copy per GPU) or fsdp (model, gradients and optimizer sharded over the GPUs; the 7B recipes' choice).
    """
    if recipe_schema:
        from ..train.recipe import recipe_json_schema

        return print_json(recipe_json_schema())
    from ..train import load_recipe

    recipe, overrides = recipe_and_overrides(recipe, args or [])
    resolved = load_recipe(recipe, overrides)
    if print_config:
        sys.stdout.write(resolved.to_yaml())
        return
    from ..train import train as run_training

    summary = run_training(resolved, full=full)
    if json_out:
        print_json(summary)


def recipe_and_overrides(recipe: str | None, args: list[str]) -> tuple[str, list[str]]:
    """The recipe comes first among the arguments (no `=` in it) or from --recipe, not both."""
    from ..train.recipe import shipped_recipes

    if args and "=" not in args[0]:
        if recipe is None:
            return args[0], args[1:]
        if args[0].endswith((".yaml", ".yml")) or args[0] in shipped_recipes():
            raise AwakerError(f"the recipe is given twice ('{args[0]}' and --recipe {recipe}): give it once")
    if recipe is None:
        raise AwakerError("which recipe? awaker train RECIPE [KEY=VALUE]... (a shipped name such as stage1, or a "
                         "YAML file); `awaker train --help` lists them")
    return recipe, args
