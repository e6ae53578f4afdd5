"""LoRA initialisations from the base weights (PiSSA, OLoRA) and the orthogonal init: the same A, B and residual base
as HF peft from the same seed and weights, the base function at the start, files both ways, the conversion to a plain
LoRA adapter, and the base given back when the adapter leaves."""

from __future__ import annotations

import warnings

import pytest
import torch

import graftkit
from tests.conftest import randomize_adapters, run, tiny_gpt2, tiny_llama, token_batch

peft = pytest.importorskip("peft")
INITS = ["pissa", "pissa_niter_4", "olora", "orthogonal"]


def config(library, init, **kwargs):
    return library.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                              init_lora_weights=init, **kwargs)


def both(init, **kwargs):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_llama(), config(peft, init, **kwargs))
    torch.manual_seed(0)
    ours = graftkit.get_peft_model(tiny_llama(), config(graftkit, init, **kwargs))
    return ours, theirs


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("init", INITS)
def test_same_adapter_and_residual_as_peft_and_the_base_function(init, use_dora):
    ours, theirs = both(init, use_dora=use_dora)
    mine = {k.replace("adapters.default.", ""): v for k, v in ours.state_dict().items()}
    peers = {k.replace(".default", "").replace("magnitude_vector.weight", "magnitude_vector"): v
             for k, v in theirs.state_dict().items()}
    assert mine.keys() == peers.keys()
    for key, value in mine.items():  # adapter tensors and the (residual) base weights
        torch.testing.assert_close(value, peers[key], rtol=1e-5, atol=1e-6, msg=key)
    lora_b = ours.model.model.layers[0].self_attn.q_proj.adapters["default"].lora_B.weight
    assert lora_b.abs().max() > 0  # not LoRA's zero B: the start is the base function for another reason
    x = token_batch()
    torch.testing.assert_close(run(ours, x), run(tiny_llama(), x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_files_move_both_ways(tmp_path, init):
    x = token_batch()
    ours, _ = both(init)
    randomize_adapters(ours, std=0.1)  # "trained"
    out = run(ours, x)
    ours.save_pretrained(tmp_path / "g")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "g").eval()  # recomputes the residual on load
    torch.testing.assert_close(run(theirs, x), out, rtol=1e-5, atol=1e-6)
    theirs.save_pretrained(tmp_path / "p")
    back = graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "p")
    torch.testing.assert_close(run(back, x), out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_conversion_to_plain_lora_for_the_original_base(tmp_path, init, use_rslora):
    x = token_batch()
    ours, _ = both(init, use_rslora=use_rslora)
    ours.save_pretrained(tmp_path / "initial")  # before training
    randomize_adapters(ours, std=0.1)
    out = run(ours, x)
    ours.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "initial")
    converted = graftkit.PeftConfig.from_pretrained(tmp_path / "lora")
    assert converted.init_lora_weights is True and converted.r == 8
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora").eval()  # the original base
    torch.testing.assert_close(run(theirs, x), out, rtol=1e-5, atol=1e-5)
    mine = graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora")
    torch.testing.assert_close(run(mine, x), out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(mine.merge_and_unload(), x), out, rtol=1e-5, atol=1e-5)
    plain = graftkit.get_peft_model(tiny_llama(), config(graftkit, True))
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(graftkit.UsageError, match="plain LoRA adapter already"):
        plain.save_pretrained(tmp_path / "x", path_initial_model_for_weight_conversion=tmp_path / "plain")


def test_the_base_comes_back_when_the_adapter_leaves():
    original = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    for leave in ("delete", "unload"):
        model = graftkit.get_peft_model(tiny_llama(), config(graftkit, "pissa"))
        model.add_adapter("other", config(graftkit, True))
        randomize_adapters(model, std=0.1)
        assert not torch.equal(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight,
                               original["model.layers.0.self_attn.q_proj.weight"])  # the residual while attached
        if leave == "delete":
            model.delete_adapter("default")
            model.delete_adapter("other")
            base = model.get_base_model()
        else:
            base = model.unload()
        state = base.state_dict()
        for key, value in original.items():
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_merge_and_unload_keeps_the_trained_function():
    x = token_batch()
    model, _ = both("olora")
    randomize_adapters(model, std=0.1)
    out = run(model, x)
    torch.testing.assert_close(run(model.merge_and_unload(), x), out, rtol=1e-5, atol=1e-5)


def test_errors():
    with pytest.raises(graftkit.ConfigError, match="even ranks"):
        graftkit.LoraConfig(r=3, init_lora_weights="orthogonal")
    for name in ("eva", "corda", "loftq", "lora_ga", "mica"):
        with pytest.raises(graftkit.UnsupportedError, match="does not implement yet"):
            graftkit.LoraConfig(init_lora_weights=name)
    with pytest.raises(graftkit.UnsupportedError, match="not implemented"):
        graftkit.LoraConfig(init_lora_weights="pissa_niter_x")
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(graftkit.TargetError):  # the failed call leaves no residual behind
        graftkit.get_peft_model(model, graftkit.LoraConfig(r=2, init_lora_weights="pissa",
                                                          target_modules=["c_attn", "ln_f"]))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_randomized_pissa_warns_on_load(tmp_path):
    model, _ = both("pissa_niter_4")
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="path_initial_model_for_weight_conversion"):
        graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    warnings.simplefilter("default")
