"""Hot-swapping LoRA adapters in place: a compiled model takes adapters of other values, lower ranks, other alphas
and fewer layers without recompiling (a counting backend counts compilations), and bad swaps change nothing."""

from __future__ import annotations

import pytest
import torch

import graftkit
from tests.conftest import randomize_adapters, run, tiny_llama, token_batch


def saved(tmp_path, name, seed, **kwargs):
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    config.update(kwargs)
    model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(**config))
    randomize_adapters(model, seed=seed)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name, run(model, token_batch())


def test_compiled_model_swaps_without_recompiling(tmp_path):
    first, out_first = saved(tmp_path, "a", 1)
    lower, out_lower = saved(tmp_path, "b", 2, r=2, lora_alpha=16)  # lower rank, another scale
    fewer, out_fewer = saved(tmp_path, "c", 3, lora_alpha=3, target_modules=["q_proj"])  # fewer layers
    model = graftkit.PeftModel.from_pretrained(tiny_llama(), first)
    graftkit.prepare_model_for_compiled_hotswap(model, target_rank=4)
    compilations = []

    def backend(graph, example_inputs):
        compilations.append(graph)
        return graph.forward

    compiled = torch.compile(model, backend=backend)
    x = token_batch()

    def logits():
        with torch.no_grad():
            return compiled(**x).logits

    torch.testing.assert_close(logits(), out_first)
    count = len(compilations)
    assert count >= 1
    for path, expected in ((lower, out_lower), (fewer, out_fewer), (first, out_first)):
        graftkit.hotswap_adapter(compiled, path, adapter_name="default")
        torch.testing.assert_close(logits(), expected, rtol=1e-5, atol=1e-6)
    assert len(compilations) == count  # no recompilation
    model.save_pretrained(tmp_path / "after")  # what the model holds now saves and reloads as the last adapter
    reloaded = graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "after")
    torch.testing.assert_close(run(reloaded, x), out_first, rtol=1e-5, atol=1e-6)


def test_bad_swaps_change_nothing(tmp_path):
    first, out_first = saved(tmp_path, "a", 1, r=2)
    more_layers, _ = saved(tmp_path, "b", 2, r=2, target_modules=["q_proj", "v_proj", "k_proj"])
    higher, _ = saved(tmp_path, "c", 3, r=8)
    dora, _ = saved(tmp_path, "d", 4, r=2, use_dora=True)
    model = graftkit.PeftModel.from_pretrained(tiny_llama(), first)
    with pytest.raises(graftkit.CheckpointError, match="adapts layers"):
        graftkit.hotswap_adapter(model, more_layers, "default")
    with pytest.raises(graftkit.CheckpointError, match="target_rank"):
        graftkit.hotswap_adapter(model, higher, "default")
    with pytest.raises(graftkit.ConfigError, match="use_dora"):
        graftkit.hotswap_adapter(model, dora, "default")
    with pytest.raises(graftkit.AdapterNameError):
        graftkit.hotswap_adapter(model, first, "other")
    torch.testing.assert_close(run(model, token_batch()), out_first)
    model.merge_adapter()
    with pytest.raises(graftkit.UsageError, match="merged"):
        graftkit.hotswap_adapter(model, first, "default")
    model.unmerge_adapter()
    compiled = torch.compile(model, backend="eager")
    with pytest.raises(graftkit.UsageError, match="before torch.compile"):
        graftkit.prepare_model_for_compiled_hotswap(compiled, target_rank=8)
    with pytest.raises(graftkit.UsageError, match="above target_rank"):
        graftkit.prepare_model_for_compiled_hotswap(model, target_rank=1)


def test_swap_keeps_what_is_trained_in_full(tmp_path):
    """Layers the new adapter leaves out are zeroed LoRA layers; a head trained in full cannot be left out."""
    from tests.conftest import tiny_bert_cls
    config = dict(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    first = graftkit.get_peft_model(tiny_bert_cls(), graftkit.LoraConfig(**config))
    randomize_adapters(first, seed=1)
    first.save_pretrained(tmp_path / "a")
    no_head = graftkit.get_peft_model(tiny_bert_cls(), graftkit.LoraConfig(r=2, target_modules=["query"]))
    no_head.save_pretrained(tmp_path / "b")
    model = graftkit.PeftModel.from_pretrained(tiny_bert_cls(), tmp_path / "a")
    out = run(model, token_batch())
    with pytest.raises(graftkit.CheckpointError, match="trains in full"):
        graftkit.hotswap_adapter(model, tmp_path / "b", "default")
    torch.testing.assert_close(run(model, token_batch()), out)
