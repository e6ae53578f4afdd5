"""Configs that do not fit the model they meet are refused where they meet it, never accepted silently: prefix sizes,
IA3 feed-forward patterns, AdaLoRA ranks, task heads, subfolders, and calls on a model whose adapters are gone."""

from __future__ import annotations

import os

import pytest
import torch

import graftkit
from graftkit.layer import AdaptedLayer
from tests.conftest import randomize_adapters, run, tiny_llama, token_batch


def prefix(**kwargs) -> graftkit.PrefixTuningConfig:
    return graftkit.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, **kwargs)


@pytest.mark.parametrize("fields, message", [
    ({"num_layers": 5}, "num_layers=5, but LlamaForCausalLM has 2 attention layers"),
    ({"token_dim": 12, "num_attention_heads": 2}, "token_dim=12 with num_attention_heads=2 does not fit"),
    ({"token_dim": 16, "num_attention_heads": 4}, "1 key/value heads of 8: token_dim=8"),
])
def test_a_prefix_that_does_not_fit_the_cache_is_refused(fields, message):
    base = tiny_llama()
    x = token_batch()
    before = run(base, x)
    with pytest.raises(graftkit.ConfigError, match=message):
        graftkit.get_peft_model(base, prefix(**fields))
    assert torch.equal(run(base, x), before)


def test_a_prefix_in_all_heads_terms_is_converted_to_the_cache_and_runs():
    model = graftkit.get_peft_model(tiny_llama(), prefix(token_dim=16, num_attention_heads=2, num_layers=2))
    config = model.peft_config["default"]
    assert (config.token_dim, config.num_attention_heads) == (8, 1)  # 1 key/value head of 8 (grouped-query)
    assert run(model, token_batch()).shape[-1] == 64


def test_a_prefix_saved_on_another_model_is_refused_at_load(tmp_path):
    model = graftkit.get_peft_model(tiny_llama(num_hidden_layers=3), prefix())
    randomize_adapters(model, seed=3)
    model.save_pretrained(tmp_path)
    base = tiny_llama()
    with pytest.raises(graftkit.ConfigError, match="has 2 attention layers"):
        graftkit.PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, AdaptedLayer) for m in base.modules())


@pytest.mark.parametrize("targets, feedforward, left_out", [
    (["down_proj", "q_proj"], r".*mlp\.(down|up)_proj", "up_proj"),
    (r".*\.(q_proj|v_proj)", ["down_proj"], "down_proj"),
])
def test_ia3_feedforward_layers_must_be_targets_with_a_regex_on_either_side(targets, feedforward, left_out):
    config = graftkit.IA3Config(target_modules=targets, feedforward_modules=feedforward)
    with pytest.raises(graftkit.ConfigError, match=f"selects 2 layer.*{left_out}"):
        graftkit.get_peft_model(tiny_llama(), config)


def test_ia3_feedforward_regex_that_fits_scales_the_inputs():
    config = graftkit.IA3Config(target_modules=r".*\.(down_proj|q_proj)", feedforward_modules=r".*down_proj",
                                init_ia3_weights=False)
    model = graftkit.get_peft_model(tiny_llama(), config)
    down = model.get_base_model().model.layers[0].mlp.down_proj
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert down.adapters["default"].ia3_l.shape == (1, 32) and q.adapters["default"].ia3_l.shape == (16, 1)
    with pytest.raises(graftkit.ConfigError, match="selects no layer"):
        graftkit.get_peft_model(tiny_llama(), graftkit.IA3Config(target_modules=r".*q_proj",
                                                                  feedforward_modules=r".*nothing"))


def test_adalora_ranks_that_cannot_be_are_refused():
    with pytest.raises(graftkit.ConfigError, match="target_r=16 is above init_r=12"):
        graftkit.AdaLoraConfig(target_r=16, init_r=12, total_step=100)
    config = graftkit.AdaLoraConfig(target_modules=["q_proj"], init_r=4, target_r=2, total_step=100,
                                    rank_pattern={"model.layers.0.mlp.down_proj.lora_E": [True, False, True, True]})
    with pytest.raises(graftkit.ConfigError, match=r"rank_pattern names 1 layer\(s\) the adapter does not target"):
        graftkit.get_peft_model(tiny_llama(), config)
    fitting = graftkit.AdaLoraConfig(target_modules=["q_proj"], init_r=4, target_r=2, total_step=100,
                                     rank_pattern={"model.layers.0.self_attn.q_proj.lora_E": [True, False, True, True]})
    model = graftkit.get_peft_model(tiny_llama(), fitting)
    assert model.get_base_model().model.layers[0].self_attn.q_proj.adapters["default"].lora_E.shape[0] == 3


@pytest.mark.parametrize("subfolder", ["../outside", "inner/../../outside", "ABSOLUTE"])
def test_a_subfolder_never_leaves_the_adapter_folder(tmp_path, subfolder):
    model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "outside")
    (tmp_path / "adapter" / "inner").mkdir(parents=True)
    subfolder = str(tmp_path / "outside") if subfolder == "ABSOLUTE" else subfolder
    with pytest.raises(graftkit.CheckpointError, match="leaves the adapter's folder"):
        graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter", subfolder=subfolder)


def test_a_task_type_without_its_head_is_refused(tmp_path):
    base = tiny_llama()
    with pytest.raises(graftkit.UsageError, match="task_type SEQ_CLS trains the model's task head"):
        graftkit.get_peft_model(base, graftkit.LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS"))
    assert not any(isinstance(m, AdaptedLayer) for m in base.modules())
    custom = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(
        r=2, target_modules=["q_proj"], task_type="SEQ_CLS", modules_to_save=["lm_head"]))  # a head named by hand
    assert type(custom.get_base_model().lm_head).__name__ == "ModulesToSave"


def test_set_adapter_after_unload_and_saving_nothing_are_refused(tmp_path):
    model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    model.unload()
    with pytest.raises(graftkit.UsageError, match="after unload"):
        model.set_adapter("default")
    merged = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    merged.merge_and_unload()
    with pytest.raises(graftkit.UsageError, match="after unload"):
        merged.set_adapter("default")
    model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_adapters(model, seed=3)
    model.save_pretrained(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    model.delete_adapter("default")
    with pytest.raises(graftkit.UsageError, match="holds no adapters"):
        model.save_pretrained(tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
