"""The state-dict functions against HF peft on the same weights: ``get/set_peft_model_state_dict``,
``get/set_base_model_state_dict``, what ``load_adapter`` returns, and ``ignore_mismatched_sizes``."""

from __future__ import annotations

import warnings

import pytest
import torch

import graftkit
from tests.conftest import run, tiny_llama, token_batch

peft = pytest.importorskip("peft")

CONFIGS = {
    "lora": ("LoraConfig", dict(r=4, target_modules=["q_proj", "v_proj"])),
    "dora": ("LoraConfig", dict(r=2, target_modules=["q_proj", "down_proj"], use_dora=True)),
    "embeddings-and-saved-head": ("LoraConfig", dict(r=2, target_modules=["embed_tokens", "q_proj"],
                                                     modules_to_save=["lm_head"])),
    "ia3": ("IA3Config", dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "adalora": ("AdaLoraConfig", dict(init_r=4, target_r=2, target_modules=["q_proj"], total_step=10)),
}


def pair(case: str, seed: int = 5):
    """The same base and config in both libraries, with the same random non-zero adapter weights."""
    name, kwargs = CONFIGS[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(), getattr(peft, name)(**kwargs))
    ours = graftkit.get_peft_model(tiny_llama(), getattr(graftkit, name)(**kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in theirs.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def assert_same_tensors(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_get_peft_model_state_dict_matches_peft(case):
    theirs, ours = pair(case)
    mine = graftkit.get_peft_model_state_dict(ours)
    assert_same_tensors(mine, peft.get_peft_model_state_dict(theirs))
    assert all(not t.requires_grad for t in mine.values())
    assert_same_tensors(graftkit.get_peft_model_state_dict(ours, save_embedding_layers=False),
                        peft.get_peft_model_state_dict(theirs, save_embedding_layers=False))
    # Values from a given full state dict (what FSDP gathers), not from the live model.
    full = {k: v + 1 for k, v in ours.state_dict().items()}
    from_full = graftkit.get_peft_model_state_dict(ours, state_dict=full)
    assert_same_tensors(from_full, peft.get_peft_model_state_dict(
        theirs, state_dict={k: v + 1 for k, v in theirs.state_dict().items()}))


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_set_peft_model_state_dict_loads_and_reports_keys_as_peft(case):
    theirs, ours = pair(case)
    saved = peft.get_peft_model_state_dict(theirs)
    fresh_theirs, fresh_ours = pair(case, seed=9)
    dropped = next(k for k in saved if "lora_" in k or "ia3_" in k)
    partial = {k: v for k, v in saved.items() if k != dropped}
    partial["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight_typo"] = torch.zeros(1)
    partial["base_model.model.nowhere.lora_A.weight"] = torch.zeros(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = peft.set_peft_model_state_dict(fresh_theirs, partial)
    got = graftkit.set_peft_model_state_dict(fresh_ours, partial)
    assert sorted(got.missing_keys) == sorted(expected.missing_keys)
    assert sorted(got.unexpected_keys) == sorted(expected.unexpected_keys)
    assert_same_tensors(fresh_ours.state_dict(), fresh_theirs.state_dict())


def test_mismatched_sizes_are_refused_or_skipped_as_asked(tmp_path):
    theirs, ours = pair("lora")
    saved = peft.get_peft_model_state_dict(theirs)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    bad = {**saved, key: torch.ones(3, 16)}
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(RuntimeError):
        peft.set_peft_model_state_dict(theirs, bad)
    with pytest.raises(graftkit.StateDictError, match="ignore_mismatched_sizes"):
        graftkit.set_peft_model_state_dict(ours, bad)
    assert_same_tensors(ours.state_dict(), before)  # nothing was loaded
    fresh_theirs, fresh_ours = pair("lora", seed=9)
    with pytest.warns(UserWarning):
        peft.set_peft_model_state_dict(fresh_theirs, bad, ignore_mismatched_sizes=True)
    with pytest.warns(graftkit.PeftWarning, match="q_proj.lora_A"):
        graftkit.set_peft_model_state_dict(fresh_ours, bad, ignore_mismatched_sizes=True)
    assert_same_tensors(fresh_ours.state_dict(), fresh_theirs.state_dict())
    # The same through the folder loaders: a file of another rank.
    other = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=8, target_modules=["q_proj", "v_proj"],
                                                                      init_lora_weights=False))
    other.save_pretrained(tmp_path)
    narrow = graftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    with pytest.raises(graftkit.CheckpointError, match="shape"):
        graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path, config=narrow)
    with pytest.warns(graftkit.PeftWarning, match="ignore_mismatched_sizes"):
        loaded = graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path, ignore_mismatched_sizes=True, config=narrow)
    layer = loaded.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.shape == (4, 16)
    assert torch.equal(layer.lora_B["default"].weight, torch.zeros(16, 4))  # skipped: still its initial value


def test_load_adapter_returns_what_peft_returns(tmp_path):
    theirs, ours = pair("dora")
    ours.save_pretrained(tmp_path)
    assert tuple(ours.load_adapter(tmp_path, "again")) == ([], [])
    assert tuple(theirs.load_adapter(tmp_path, "again")) == ([], [])
    # A file without one tensor, loaded non-strictly: the same missing keys, under their in-memory names.
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    dropped = next(k for k in tensors if k.endswith("lora_B.weight"))
    del tensors[dropped]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mine = ours.load_adapter(tmp_path, "partial", strict=False)
        expected = theirs.load_adapter(tmp_path, "partial")
    assert mine.missing_keys == expected.missing_keys == [dropped.replace("lora_B.weight", "lora_B.partial.weight")]
    assert mine.unexpected_keys == expected.unexpected_keys == []


@pytest.mark.parametrize("case", ["lora", "embeddings-and-saved-head", "ia3"])
def test_base_model_state_dict_round_trips_under_the_original_names(case):
    theirs, ours = pair(case)
    original = tiny_llama().state_dict()
    mine = graftkit.get_base_model_state_dict(ours)
    assert_same_tensors(mine, peft.get_base_model_state_dict(theirs))
    assert list(mine) == list(original)
    # Load other base weights under the original names: the wrapped model computes with them.
    changed = {k: v * 1.5 for k, v in original.items()}
    result = graftkit.set_base_model_state_dict(ours, changed)
    assert tuple(result) == ([], [])
    peft.set_base_model_state_dict(theirs, changed)
    x = token_batch()
    torch.testing.assert_close(run(ours, x), run(theirs, x), atol=1e-5, rtol=0)
    partial = {k: v for k, v in changed.items() if "lm_head" not in k}
    partial["not.a.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="lm_head"):
        graftkit.set_base_model_state_dict(ours, partial)
    with pytest.raises(RuntimeError):
        peft.set_base_model_state_dict(theirs, partial)
    assert tuple(graftkit.set_base_model_state_dict(ours, partial, strict=False)) == \
        tuple(peft.set_base_model_state_dict(theirs, partial, strict=False))
