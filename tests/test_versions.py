"""The version claims stay true: the floor lane pins every lower bound of pyproject.toml, and the README names them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
# Bounds that are not claims about graftkit: the test tools and the reference implementation.
NOT_CLAIMS = {"pytest", "ruff", "peft", "attrs"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def lower_bounds() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    bounds: dict[str, str] = {}
    for requirement in requirements:
        name = _name(requirement)
        found = re.search(r">=\s*([0-9][^,;\s]*)", requirement)
        if name in NOT_CLAIMS or not found:
            continue
        assert bounds.setdefault(name, found.group(1)) == found.group(1), (
            f"pyproject.toml gives {name} two lower bounds: {bounds[name]} and {found.group(1)}")
    return bounds


def floor_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "floor.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[_name(name)] = version.strip()
    return pins


def _same(bound: str, pin: str) -> bool:
    pad = lambda v: [int(p) for p in v.split(".")] + [0] * (3 - len(v.split(".")))  # noqa: E731
    return pad(bound) == pad(pin)


def test_the_floor_lane_pins_every_lower_bound():
    bounds, pins = lower_bounds(), floor_pins()
    assert {"torch", "transformers", "trl", "accelerate", "datasets"} <= set(bounds)
    missing = sorted(set(bounds) - set(pins))
    assert not missing, f".ci/floor.txt pins no version of {missing}; add each at its pyproject.toml lower bound"
    differ = {name: (bounds[name], pins[name]) for name in bounds if not _same(bounds[name], pins[name])}
    assert not differ, f"pyproject.toml lower bound vs .ci/floor.txt pin: {differ}"


def test_the_readme_names_the_floor_and_each_lane():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    tested = "\n\n".join(readme.split("**Tested versions.**", 1)[1].split("\n\n")[:2])  # the words and the table
    pins = floor_pins()
    for name in ("torch", "transformers", "trl", "accelerate", "datasets"):
        assert pins[name] in tested, f"README's Tested versions does not name the floor's {name} {pins[name]}"
    for lane in ("vllm", "axolotl"):
        pins = dict(line.split("==") for line in (ROOT / ".ci" / f"{lane}.txt").read_text().splitlines()
                    if line and not line.startswith("#"))
        assert f"transformers {pins['transformers']}" in tested, f"README's Tested versions misses the {lane} lane"
        assert f".ci/{lane}.txt" in (ROOT / ".ci" / "run").read_text(encoding="utf-8"), f".ci/run runs no {lane} lane"
