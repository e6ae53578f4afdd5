"""Llama-Adapter (adaption prompts): zero-init equality, forward and files equal to HF peft's on Llama and Mistral
(grouped-query attention), generation with the KV cache equal to cacheless greedy decoding, clean removal."""

from __future__ import annotations

import warnings

import pytest
import torch

import graftkit
from tests.conftest import DEVICE, run, tiny_gpt2, token_batch

peft = pytest.importorskip("peft")
warnings.filterwarnings("ignore", message=".*attention mask.*")

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, eos_token_id=None, tie_word_embeddings=False)


def tiny(kind: str, seed: int = 0):
    import transformers

    config_class, model_class = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    }[kind]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**SIZES)
    return getattr(transformers, model_class)(config).eval().to(DEVICE)


def config(library, **kwargs):
    return library.AdaptionPromptConfig(adapter_len=3, adapter_layers=2, task_type="CAUSAL_LM", **kwargs)


def adapted(kind: str, seed: int = 1):
    model = graftkit.get_peft_model(tiny(kind), config(graftkit))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adaption_gate" in name:  # open the zero-initialised gates
                param.copy_((0.5 + torch.rand(param.shape, generator=g)).to(param.device))
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_zero_init_is_the_base_model_and_gates_change_it(kind):
    x = token_batch()
    base = run(tiny(kind), x)
    model = graftkit.get_peft_model(tiny(kind), config(graftkit))
    assert torch.equal(run(model, x), base)  # exactly: the gates start at 0
    assert model.get_nb_trainable_parameters()[0] == 2 * (3 * 32 + 1)
    opened = adapted(kind)
    assert (run(opened, x) - base).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_matches_peft_both_ways(tmp_path, kind):
    x = token_batch()
    ours = adapted(kind)
    out = run(ours, x)
    ours.save_pretrained(tmp_path / "g")
    theirs = peft.PeftModel.from_pretrained(tiny(kind), tmp_path / "g").eval()
    torch.testing.assert_close(run(theirs, x), out, rtol=0, atol=1e-6)
    with torch.no_grad():  # other values, written by HF peft
        for name, param in theirs.named_parameters():
            if "adaption_" in name:
                param.mul_(-0.5)
    theirs.save_pretrained(tmp_path / "p")
    back = graftkit.PeftModel.from_pretrained(tiny(kind), tmp_path / "p")
    torch.testing.assert_close(run(back, x), run(theirs, x), rtol=0, atol=1e-6)
    assert (run(back, x) - out).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_generate_with_the_cache_equals_cacheless_greedy(kind):
    model = adapted(kind)
    x = token_batch()
    out = model.generate(**x, max_new_tokens=6, do_sample=False)
    ids, mask = x["input_ids"], x["attention_mask"]
    for _ in range(6):
        with torch.no_grad():
            step = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, step], 1), torch.cat([mask, torch.ones_like(step)], 1)
    assert torch.equal(out, ids)


def test_gradient_checkpointing_gives_the_same_gradients():
    x = token_batch()
    grads = []
    for checkpointing in (False, True):
        model = adapted("llama")
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model(**x, labels=x["input_ids"]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_disable_switch_delete_and_unload_leave_no_hooks(tmp_path):
    x = token_batch()
    base = run(tiny("llama"), x)
    model = adapted("llama", seed=1)
    first = run(model, x)
    other = adapted("llama", seed=2)
    other.save_pretrained(tmp_path)
    model.load_adapter(tmp_path, adapter_name="b")
    torch.testing.assert_close(run(model, x), first)  # added, not active
    model.set_adapter("b")
    torch.testing.assert_close(run(model, x), run(other, x))
    with model.disable_adapter():
        assert torch.equal(run(model, x), base)
    with pytest.raises(graftkit.UnsupportedError, match="no weights to merge"):
        model.merge_adapter()
    model.delete_adapter("b")
    torch.testing.assert_close(run(model, x), first)
    plain = model.unload()
    assert not any(m._forward_hooks for m in plain.modules())
    assert torch.equal(run(plain, x), base)


def test_unsupported_models_and_bad_configs():
    with pytest.raises(graftkit.UnsupportedError, match="Llama-family"):
        graftkit.get_peft_model(tiny_gpt2(), config(graftkit))
    with pytest.raises(graftkit.ConfigError, match="adapter_layers=9"):
        graftkit.get_peft_model(tiny("llama"), graftkit.AdaptionPromptConfig(adapter_len=3, adapter_layers=9))
    with pytest.raises(graftkit.ConfigError, match="adapter_len is required to add the adapter"):
        graftkit.get_peft_model(tiny("llama"), graftkit.AdaptionPromptConfig(adapter_layers=2))
    with pytest.raises(graftkit.ConfigError, match="adapter_len must be a positive integer"):
        graftkit.AdaptionPromptConfig(adapter_len=0, adapter_layers=2)
    model = tiny("llama")
    with pytest.raises(graftkit.UnsupportedError, match="not a Llama-family"):
        graftkit.get_peft_model(model, config(graftkit, target_modules="mlp"))
    assert not any(m._forward_hooks for m in model.modules())  # the failed call left the model as it was
