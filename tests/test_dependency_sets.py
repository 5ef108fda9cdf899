"""The two installed sets CI tests are the two ends of pyproject.toml's ranges: every requirement is pinned
in both, inside its range, and the oldest set pins each lower bound exactly (so `>=X` was tested at X)."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
UNTESTED_EXTRAS = {"wandb"}  # documented as untested: neither set installs it


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for name, reqs in project["optional-dependencies"].items() if name not in UNTESTED_EXTRAS
              for r in reqs]
    return [Requirement(r) for r in project["dependencies"] + extras]


def pins(name: str) -> dict[str, Version]:
    lines = (ROOT / "requirements" / name).read_text().splitlines()
    pairs = [line.split("#")[0].strip().split("==") for line in lines if "==" in line.split("#")[0]]
    return {canonicalize_name(package): Version(version) for package, version in pairs}


@pytest.mark.parametrize("lock", ["lock.txt", "oldest.txt"])
def test_every_requirement_is_pinned_inside_its_range(lock):
    pinned = pins(lock)
    for req in requirements():
        name = canonicalize_name(req.name)
        assert name in pinned, f"{lock} does not pin {name}"
        assert req.specifier.contains(pinned[name], prereleases=True), f"{lock}: {name}=={pinned[name]} not {req}"


def test_the_oldest_set_pins_every_lower_bound():
    pinned = pins("oldest.txt")
    for req in requirements():
        floor = [Version(s.version) for s in req.specifier if s.operator == ">="]
        if floor:
            name = canonicalize_name(req.name)
            assert pinned[name] == floor[0], f"pyproject says {req}, but oldest.txt tests {name}=={pinned[name]}"
