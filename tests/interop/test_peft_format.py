"""Differential tests against HF peft 0.21: the same files, the same numbers, both ways.

Every case builds the same tiny base twice (same seed), puts a *random, non-zero* adapter on it in one
library, saves, loads the folder in the other library, and compares logits (fp32, max abs diff <= 1e-5).
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

import graftkit
from tests.conftest import (
    randomize_adapters,
    run,
    tiny_bert_cls,
    tiny_convnet,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
    token_batch,
)

peft = pytest.importorskip("peft")

CASES = {
    "llama-attention": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), None),
    "llama-default-targets": (tiny_llama, dict(r=4, lora_alpha=16, task_type="CAUSAL_LM"), None),
    "llama-all-linear": (tiny_llama, dict(r=4, lora_alpha=8, target_modules="all-linear"), None),
    "llama-modules-to-save": (tiny_llama, dict(r=2, target_modules=["k_proj"], modules_to_save=["lm_head"]), None),
    "llama-dora-rslora-bias": (
        lambda: tiny_llama(attention_bias=True),
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"], use_dora=True, use_rslora=True,
             bias="lora_only"),
        None,
    ),
    "llama-patterns": (
        tiny_llama,
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"],
             rank_pattern={"layers.0.self_attn.q_proj": 2, "gate_proj": 6}, alpha_pattern={"v_proj": 3}),
        None,
    ),
    "llama-regex-exclude-layers": (
        tiny_llama,
        dict(r=2, target_modules=["q_proj", "up_proj"], layers_to_transform=[1], exclude_modules=["up_proj"]),
        None,
    ),
    "gpt2-conv1d": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True), None),
    "gpt2-dora": (tiny_gpt2, dict(r=4, target_modules=["c_attn", "c_fc"], use_dora=True, fan_in_fan_out=True), None),
    "llama-embedding": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]), None),
    "bert-seq-cls": (tiny_bert_cls, dict(r=4, lora_alpha=8, task_type="SEQ_CLS"), None),
    "t5-seq2seq": (tiny_t5, dict(r=4, lora_alpha=8, task_type="SEQ_2_SEQ_LM"), "t5"),
    "conv2d": (tiny_convnet, dict(r=2, lora_alpha=4, target_modules=["conv", "conv1x1"]), "image"),
    "llama-dropout-regex": (tiny_llama, dict(r=4, lora_dropout=0.1, target_modules=r".*\.(q|v)_proj"), None),
}


def inputs_for(kind):
    if kind == "image":
        return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    batch = token_batch()
    if kind == "t5":
        batch["decoder_input_ids"] = batch["input_ids"][:, :4]
    return batch


def peft_model_with(build, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(build(), peft.LoraConfig(init_lora_weights=False, **kwargs))
    randomize_adapters(model)
    return model.eval()


def graft_model_with(build, kwargs):
    model = graftkit.get_peft_model(build(), graftkit.LoraConfig(init_lora_weights=False, **kwargs))
    randomize_adapters(model, seed=11)
    return model.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_adapter_loads_in_graftkit(case, tmp_dir):
    build, kwargs, kind = CASES[case]
    x = inputs_for(kind)
    reference = peft_model_with(build, kwargs)
    expected = run(reference, x)
    base_out = run(build(), x)
    assert (expected - base_out).abs().max() > 1e-3, "the adapter must change the output"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.save_pretrained(tmp_dir)
    loaded = graftkit.PeftModel.from_pretrained(build(), tmp_dir).eval()
    torch.testing.assert_close(run(loaded, x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_graftkit_saved_adapter_loads_in_peft(case, tmp_dir):
    build, kwargs, kind = CASES[case]
    x = inputs_for(kind)
    ours = graft_model_with(build, kwargs)
    expected = run(ours, x)
    assert (expected - run(build(), x)).abs().max() > 1e-3, "the adapter must change the output"
    ours.save_pretrained(tmp_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(build(), tmp_dir).eval()
    torch.testing.assert_close(run(theirs, x), expected, atol=1e-5, rtol=0)
    # Same file layout: identical tensor names and config keys to what peft writes for this config.
    peft_dir = os.path.join(tmp_dir, "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(peft_dir)
    assert set(load_file(os.path.join(tmp_dir, "adapter_model.safetensors"))) == set(
        load_file(os.path.join(peft_dir, "adapter_model.safetensors"))
    )
    ours_cfg = json.load(open(os.path.join(tmp_dir, "adapter_config.json")))
    peft_cfg = json.load(open(os.path.join(peft_dir, "adapter_config.json")))
    assert set(ours_cfg) == set(peft_cfg)


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_outputs_as_peft_on_same_weights(case):
    """Both libraries built from one config, adapter weights copied across: the forward maths agree."""
    build, kwargs, kind = CASES[case]
    x = inputs_for(kind)
    reference = peft_model_with(build, kwargs)
    ours = graftkit.get_peft_model(build(), graftkit.LoraConfig(init_lora_weights=False, **kwargs)).eval()
    # The in-memory names are peft's: its whole state dict loads strictly, adapters and base alike.
    assert list(ours.state_dict()) == list(reference.state_dict())
    ours.load_state_dict(reference.state_dict(), strict=True)
    torch.testing.assert_close(run(ours, x), run(reference, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["llama-attention", "llama-dora-rslora-bias", "gpt2-conv1d", "bert-seq-cls",
                                  "llama-embedding", "t5-seq2seq", "llama-modules-to-save"])
def test_trainable_parameter_counts_match_peft(case, capsys):
    build, kwargs, _ = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build(), peft.LoraConfig(**kwargs))
    ours = graftkit.get_peft_model(build(), graftkit.LoraConfig(**kwargs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours.print_trainable_parameters()
    ours_line = capsys.readouterr().out
    theirs.print_trainable_parameters()
    assert ours_line == capsys.readouterr().out


def test_trainable_counts_with_tied_embeddings_and_meta_device():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    kwargs = dict(r=8, target_modules="all-linear")
    with torch.device("meta"):
        ours = graftkit.get_peft_model(LlamaForCausalLM(cfg), graftkit.LoraConfig(**kwargs))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.get_peft_model(LlamaForCausalLM(cfg), peft.LoraConfig(**kwargs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    trainable, total = ours.get_nb_trainable_parameters()
    # tied lm_head counted once: embeddings 128*32 once, 2 layers of attention+mlp+norms, final norm
    layer = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64 + 2 * 32
    lora_per_layer = 8 * (32 + 32) * 2 + 8 * (32 + 16) * 2 + 8 * (32 + 64) * 3
    assert trainable == 2 * lora_per_layer
    assert total == 128 * 32 + 2 * layer + 32 + trainable


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_trainable_tokens_method_moves_both_ways(tied, tmp_path):
    def base():
        return tiny_llama(tie_word_embeddings=tied)

    x = token_batch()
    x["input_ids"][0, :2] = torch.tensor([2, 9])
    theirs = peft.get_peft_model(base(), peft.TrainableTokensConfig(token_indices=[2, 9], init_weights=False))
    theirs.save_pretrained(tmp_path / "peft")
    ours = graftkit.PeftModel.from_pretrained(base(), tmp_path / "peft")
    torch.testing.assert_close(run(ours, x), run(theirs, x), atol=1e-5, rtol=0)
    with torch.no_grad():
        ours.base_model.model.model.embed_tokens.trainable_tokens_delta["default"].mul_(-1)
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(base(), tmp_path / "ours")
    torch.testing.assert_close(run(back, x), run(ours, x), atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["peft_type"] == "TRAINABLE_TOKENS"
