"""Package discovery only (everything else is in pyproject.toml): every awaker_cli* package, plus
awaker_cli.recipes, which pyproject.toml maps to the repository's top-level recipes/ folder."""
from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["awaker_cli*"]), "awaker_cli.recipes"])
