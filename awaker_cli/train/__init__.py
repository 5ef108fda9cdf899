"""Staged training from YAML recipes (`awaker train --recipe stage1|stage2|stage3`)."""
from .recipe import Recipe, find_recipe, load_recipe, shipped_recipes

__all__ = ["Recipe", "find_recipe", "load_recipe", "shipped_recipes", "train"]


def train(recipe: Recipe, **kwargs):
    """Run or resume a recipe (see loop.train); imported lazily, torch and transformers are heavy."""
    from .loop import train as run

    return run(recipe, **kwargs)
