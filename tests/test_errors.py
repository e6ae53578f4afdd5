"""Bad input gets an error that names the thing; a failed operation loses nothing."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import graftkit
from graftkit.layer import AdaptedLayer
from tests.conftest import randomize_adapters, run, tiny_llama, token_batch


def saved(tmp_path, **kwargs):
    model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(**{"r": 2, **kwargs}))
    randomize_adapters(model)
    model.save_pretrained(tmp_path)
    return model


def test_target_matching_nothing_names_patterns_and_existing_modules():
    with pytest.raises(graftkit.TargetError) as err:
        graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(target_modules=["qkv"]))
    msg = str(err.value)
    assert "['qkv']" in msg and "q_proj" in msg and "LlamaForCausalLM" in msg
    assert isinstance(err.value, ValueError)


def test_unsupported_layer_kind_is_named():
    with pytest.raises(graftkit.TargetError, match="LlamaRMSNorm"):
        graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(target_modules=["norm"]))


def test_unknown_architecture_without_targets():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(2, 2)

    with pytest.raises(graftkit.TargetError, match="fc"):
        graftkit.get_peft_model(Tiny(), graftkit.LoraConfig())


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
    saved(tmp_path, r=2)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["r"] = 4
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    weights = tmp_path / "adapter_model.safetensors"  # as another writer saves it: no graftkit pairing record
    save_file(load_file(weights), weights, {"format": "pt"})
    base = tiny_llama()
    with pytest.raises(graftkit.CheckpointError) as err:
        graftkit.PeftModel.from_pretrained(base, tmp_path)
    msg = str(err.value)
    assert "lora_A.weight" in msg and "(2, 16)" in msg and "(4, 16)" in msg
    assert not any(isinstance(m, AdaptedLayer) for m in base.modules()), "a failed load leaves the model as it was"


def test_missing_and_unexpected_keys(tmp_path):
    saved(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    tensors["base_model.model.extra.lora_A.weight"] = torch.ones(1)
    save_file(tensors, path)
    with pytest.raises(graftkit.CheckpointError) as err:
        graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert dropped in str(err.value) and "extra.lora_A.weight" in str(err.value) and "strict=False" in str(err.value)
    with pytest.warns(UserWarning, match="non-strictly"):
        graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path, strict=False)


def test_pickle_only_on_opt_in(tmp_path):
    model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=2))
    randomize_adapters(model)
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    with pytest.raises(graftkit.CheckpointError, match="allow_pickle=True"):
        graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded = graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path, allow_pickle=True)
    torch.testing.assert_close(run(loaded, token_batch()), run(model, token_batch()), atol=1e-6, rtol=0)


def test_pickle_with_code_is_refused_even_on_opt_in(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    saved(tmp_path)
    os.remove(tmp_path / "adapter_model.safetensors")
    torch.save({"x": Evil()}, tmp_path / "adapter_model.bin")
    with pytest.raises(graftkit.CheckpointError, match="weights_only=True"):
        graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path, allow_pickle=True)


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    saved(tmp_path)
    before = {p: (tmp_path / p).read_bytes() for p in ("adapter_model.safetensors", "adapter_config.json")}
    model = graftkit.get_peft_model(tiny_llama(seed=5), graftkit.LoraConfig(r=2))
    randomize_adapters(model, seed=9)

    def broken(tensors, path, metadata=None):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("graftkit.io.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    after = {p: (tmp_path / p).read_bytes() for p in before}
    assert after == before
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_malformed_config_names_file(tmp_path):
    saved(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(graftkit.ConfigError, match="adapter_config.json"):
        graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_unknown_method_names_file(tmp_path):
    saved(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["peft_type"] = "SUPER_NEW"
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(graftkit.ConfigError, match=r"adapter_config.json.*SUPER_NEW"):
        graftkit.PeftConfig.from_pretrained(tmp_path)


def test_unknown_fields_warn_and_load(tmp_path):
    model = saved(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["shiny_future_option"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="shiny_future_option"):
        loaded = graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(run(loaded, token_batch()), run(model, token_batch()), atol=1e-6, rtol=0)


def test_feature_only_peft_has_is_refused(tmp_path):
    saved(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["use_qalora"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(graftkit.UnsupportedError, match="use_qalora"):
        graftkit.PeftConfig.from_pretrained(tmp_path)


def test_missing_folder_and_offline_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(graftkit.CheckpointError, match="not a local folder"):
        graftkit.PeftModel.from_pretrained(tiny_llama(), "someone/not-cached-adapter")
    (tmp_path / "empty").mkdir()
    with pytest.raises(graftkit.CheckpointError, match="adapter_config.json"):
        graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "empty")


@pytest.mark.parametrize(
    "kwargs, field",
    [(dict(r=0), "r"), (dict(lora_dropout=1.5), "lora_dropout"), (dict(bias="some"), "bias"),
     (dict(init_lora_weights="pissa_fast"), "init_lora_weights"), (dict(task_type="NOPE"), "task_type"),
     (dict(target_modules=".*q", layers_to_transform=[0]), "layers_to_transform")],
)
def test_config_validation_names_field(kwargs, field):
    with pytest.raises(graftkit.GraftkitError, match=field):
        graftkit.LoraConfig(**kwargs)


def test_duplicate_adapter_name():
    model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=2))
    with pytest.raises(graftkit.AdapterNameError, match="default"):
        model.add_adapter("default", graftkit.LoraConfig(r=2))
    with pytest.raises(graftkit.AdapterNameError, match="nope"):
        model.set_adapter("nope")


def test_modules_to_save_that_match_nothing():
    with pytest.raises(graftkit.TargetError, match="classifier_head"):
        graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=2, modules_to_save=["classifier_head"]))
