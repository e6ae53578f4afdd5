"""Behaviour of the core: trainability, training, merge/unload, disable, auto classes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import graftkit
from graftkit.layer import AdaptedLayer, ModulesToSave
from tests.conftest import (
    randomize_adapters,
    run,
    tiny_bert_cls,
    tiny_convnet,
    tiny_gpt2,
    tiny_llama,
    token_batch,
    train_steps,
)


def graft_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__module__.startswith("graftkit")]


def test_only_adapter_and_modules_to_save_train():
    model = graftkit.get_peft_model(
        tiny_llama(), graftkit.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "something must train"
    for name in trainable:
        assert ".lora_A.default." in name or ".lora_B.default." in name or ".modules_to_save.default." in name, name
    assert any("lm_head.modules_to_save.default.weight" in n for n in trainable)
    assert not model.base_model.model.lm_head.original_module.weight.requires_grad


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_modes(bias):
    model = graftkit.get_peft_model(tiny_gpt2(), graftkit.LoraConfig(r=2, target_modules=["c_attn"], bias=bias))
    trainable_biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    attn_bias = {n for n in trainable_biases if "c_attn.base_layer.bias" in n}
    assert len(attn_bias) == 2
    if bias == "lora_only":
        assert trainable_biases == attn_bias
    else:
        assert any("ln_f.bias" in n for n in trainable_biases)


def test_inference_mode_freezes_everything():
    model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=2, inference_mode=True))
    assert model.get_nb_trainable_parameters()[0] == 0


def test_training_lowers_loss():
    torch.manual_seed(0)
    # A wider init than transformers' default 0.02, so a 30-step run on a 32-wide model has signal to learn from.
    base = tiny_llama(initializer_range=0.2, hidden_size=32, intermediate_size=64)
    model = graftkit.get_peft_model(base, graftkit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.train()
    batch = token_batch(batch=4, length=12)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = train_steps(model, batch, opt, 30)
    assert losses[-1] < 0.2 * losses[0], losses
    assert not any(p.grad is not None for n, p in model.named_parameters() if "base_layer" in n)


MERGE_CASES = {
    "linear": (tiny_llama, dict(r=4, target_modules="all-linear"), None),
    "dora": (lambda: tiny_llama(attention_bias=True), dict(r=4, target_modules=["q_proj", "o_proj"], use_dora=True),
             None),
    "conv1d": (tiny_gpt2, dict(r=4, target_modules=["c_attn", "c_fc"]), None),
    "conv1d-dora": (tiny_gpt2, dict(r=4, target_modules=["c_attn"], use_dora=True), None),
    "embedding": (tiny_llama, dict(r=4, target_modules=["embed_tokens", "v_proj"]), None),
    "conv2d": (tiny_convnet, dict(r=2, target_modules=["conv", "conv1x1", "head"]), "image"),
    "modules-to-save": (tiny_bert_cls, dict(r=2, task_type="SEQ_CLS"), None),
}


def _inputs(kind):
    return torch.randn(2, 3, 6, 6) if kind == "image" else token_batch()


@pytest.mark.parametrize("case", sorted(MERGE_CASES))
def test_merge_and_unload_equals_unmerged(case):
    build, kwargs, kind = MERGE_CASES[case]
    x = _inputs(kind)
    model = graftkit.get_peft_model(build(), graftkit.LoraConfig(**kwargs)).eval()
    randomize_adapters(model)
    expected = run(model, x)
    assert (expected - run(build(), x)).abs().max() > 1e-3
    merged = model.merge_and_unload()
    assert graft_modules(merged) == []
    assert type(merged) is type(build())
    torch.testing.assert_close(run(merged, x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", sorted(MERGE_CASES))
def test_merge_unmerge_round_trip_and_disable(case):
    build, kwargs, kind = MERGE_CASES[case]
    x = _inputs(kind)
    base = build()
    base_out = run(base, x)
    before = copy.deepcopy(base.state_dict())
    model = graftkit.get_peft_model(base, graftkit.LoraConfig(**kwargs)).eval()
    randomize_adapters(model)
    adapted = run(model, x)
    with model.disable_adapter():
        assert torch.equal(run(model, x), base_out), "disabled must be the base model, bit for bit"
    assert torch.equal(run(model, x), adapted)
    model.merge_adapter()
    torch.testing.assert_close(run(model, x), adapted, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    after = model.unload().state_dict()
    for key, tensor in before.items():
        torch.testing.assert_close(after[key], tensor, atol=1e-6, rtol=0)


def test_unload_restores_base_model():
    base = tiny_llama()
    x = token_batch()
    expected = run(base, x)
    model = graftkit.get_peft_model(base, graftkit.LoraConfig(r=2, modules_to_save=["lm_head"]))
    randomize_adapters(model)
    plain = model.unload()
    assert graft_modules(plain) == []
    assert torch.equal(run(plain, x), expected)


def test_safe_merge_refuses_nan_and_leaves_model_untouched():
    model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.adapters["default"].lora_B.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(graftkit.GraftkitError, match="NaN/Inf"):
        model.merge_and_unload(safe_merge=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], equal_nan=True)
    assert all(not m.merged for m in model.modules() if isinstance(m, AdaptedLayer))


def test_inject_adapter_in_model():
    model = tiny_llama()
    out = graftkit.inject_adapter_in_model(graftkit.LoraConfig(r=2, target_modules=["q_proj"]), model)
    assert out is model
    assert isinstance(model.model.layers[0].self_attn.q_proj, AdaptedLayer)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"model.layers.{i}.self_attn.q_proj.{ab}.default.weight"
        for i in range(2)
        for ab in ("lora_A", "lora_B")
    }


def test_wrappers_pass_attributes_through():
    model = graftkit.get_peft_model(tiny_bert_cls(), graftkit.LoraConfig(r=2, task_type="SEQ_CLS"))
    query = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert query.in_features == 16 and query.weight.shape == (16, 16)
    assert isinstance(model.base_model.model.classifier, ModulesToSave)
    assert model.base_model.model.classifier.out_features == 3
    assert model.config.model_type == "bert"  # PeftModel delegates to the transformers model


def test_dropout_only_in_training_mode():
    model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj"]))
    randomize_adapters(model)
    x = token_batch()
    model.eval()
    assert torch.equal(run(model, x), run(model, x))
    model.train()
    assert not torch.equal(run(model, x), run(model, x))


def test_generate_with_adapter():
    model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=4, task_type="CAUSAL_LM"))
    randomize_adapters(model, std=1.0)
    ids = token_batch(batch=1)["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with model.disable_adapter():
        base = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, ids.shape[1] + 5)
    assert not torch.equal(out, base)


def test_auto_peft_model_loads_base_from_local_folder(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = graftkit.get_peft_model(base, graftkit.LoraConfig(r=2, task_type="CAUSAL_LM")).eval()
    randomize_adapters(model)
    assert model.peft_config["default"].base_model_name_or_path == str(base_dir)
    model.save_pretrained(adapter_dir)
    x = token_batch()
    for cls in (graftkit.AutoPeftModelForCausalLM, graftkit.AutoPeftModel):
        loaded = cls.from_pretrained(adapter_dir)
        assert isinstance(loaded, graftkit.PeftModelForCausalLM)
        torch.testing.assert_close(run(loaded, x), run(model, x), atol=1e-6, rtol=0)
    assert graftkit.PeftConfig.from_pretrained(adapter_dir).r == 2


def test_is_trainable_flag(tmp_path):
    model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=2))
    model.save_pretrained(tmp_path)
    frozen = graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0
    trainable = graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0] > 0


def test_non_default_adapter_saved_in_subfolder(tmp_path):
    model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=2), adapter_name="mine")
    randomize_adapters(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "mine" / "adapter_model.safetensors").is_file()
    loaded = graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "mine", adapter_name="mine")
    torch.testing.assert_close(run(loaded, token_batch()), run(model, token_batch()), atol=1e-6, rtol=0)


def test_bf16_base_keeps_fp32_adapters_and_bf16_activations():
    model = graftkit.get_peft_model(tiny_llama().to(torch.bfloat16), graftkit.LoraConfig(r=2))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.adapters["default"].lora_A.weight.dtype == torch.float32
    out = layer(torch.randn(2, 3, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    low = graftkit.get_peft_model(tiny_llama().to(torch.bfloat16), graftkit.LoraConfig(r=2),
                                  autocast_adapter_dtype=False)
    low_a = low.base_model.model.model.layers[0].self_attn.q_proj.adapters["default"].lora_A.weight
    assert low_a.dtype == torch.bfloat16
