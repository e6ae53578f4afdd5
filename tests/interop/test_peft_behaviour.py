"""Behaviour code written for HF peft relies on, side by side with peft on the same files: modes and trainability
after loading, errors users catch, and layer kinds both adapt."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch

import graftkit
from tests.conftest import randomize_adapters, run, tiny_llama, token_batch, train_steps

peft = pytest.importorskip("peft")
LIBRARIES = {"graftkit": graftkit, "peft": peft}


@pytest.fixture
def saved(tmp_path):
    model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=2, target_modules=["q_proj"],
                                                                      lora_dropout=0.5))
    randomize_adapters(model, seed=3)
    model.save_pretrained(tmp_path)
    return tmp_path


def lora_a_grads(model) -> dict[str, bool]:
    return {name: param.requires_grad for name, param in model.named_parameters()
            if "layers.0.self_attn.q_proj" in name and "lora_A" in name}


def adapter_of(name: str) -> str:
    return next(part for part in ("default", "other", "third") if f".{part}." in name)


@pytest.mark.parametrize("trainable", [False, True])
def test_modes_and_trainability_after_loading_match_peft(saved, trainable):
    seen = {}
    for label, lib in LIBRARIES.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.PeftModel.from_pretrained(tiny_llama().train(), saved, is_trainable=trainable)
            after_load = model.training
            model.train()
            model.load_adapter(saved, adapter_name="other", is_trainable=trainable)
            grads = {adapter_of(k): v for k, v in lora_a_grads(model).items()}
        seen[label] = (after_load, model.training, grads)
    assert seen["graftkit"] == seen["peft"]
    assert seen["graftkit"][0] is trainable and seen["graftkit"][2]["other"] is trainable


def test_a_loaded_model_gives_the_same_output_every_time(saved):
    """Dropout is off after loading for inference, whatever mode the base model was in."""
    model = graftkit.PeftModel.from_pretrained(tiny_llama().train(), saved)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


class ParamsOnly(torch.nn.Module):
    """No transformers config: default targets cannot be looked up, only the named parameter is adapted."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("writer", ["graftkit", "peft"])
def test_an_adapter_of_target_parameters_only_reloads(tmp_path, writer):
    lib = LIBRARIES[writer]
    torch.manual_seed(0)
    model = lib.get_peft_model(ParamsOnly(), lib.LoraConfig(r=2, target_parameters=["lin.weight"],
                                                            init_lora_weights=False))
    model.save_pretrained(tmp_path)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    expected = model(x)
    torch.manual_seed(0)
    loaded = graftkit.PeftModel.from_pretrained(ParamsOnly(), tmp_path)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-6)
    with loaded.disable_adapter():
        assert not torch.allclose(loaded(x), expected)  # the adapter is what makes the difference


class WithNorm(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.norm = torch.nn.BatchNorm1d(4)

    def forward(self, x):
        return self.norm(self.lin(x))


def test_a_batchnorm_in_modules_to_save_round_trips_in_both_libraries(tmp_path):
    torch.manual_seed(0)
    model = graftkit.get_peft_model(WithNorm(), graftkit.LoraConfig(r=2, target_modules=["lin"],
                                                                    modules_to_save=["norm"], init_lora_weights=False))
    model.train()
    for _ in range(3):  # running statistics and the step counter move
        model(torch.randn(8, 4, generator=torch.Generator().manual_seed(2)))
    model.eval()
    model.save_pretrained(tmp_path)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    expected = model(x)
    for lib in LIBRARIES.values():
        torch.manual_seed(0)
        loaded = lib.PeftModel.from_pretrained(WithNorm(), tmp_path).eval()
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-6)
        counter = [b for n, b in loaded.named_buffers() if n.endswith("num_batches_tracked") and "default" in n]
        assert counter and int(counter[0]) == 3


def test_attribute_access_before_init_does_not_recurse():
    """DeepSpeed's zero.Init reads attributes of modules while their __init__ runs."""
    for cls in (graftkit.PeftModel, graftkit.PeftModelForCausalLM):
        empty = cls.__new__(cls)
        assert not hasattr(empty, "peft_config")
        assert getattr(empty, "_parameters", "missing") == "missing"


def test_mixed_batches_through_a_saved_module_returning_a_tuple_are_refused_clearly():
    class Recurrent(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = torch.nn.GRU(4, 4, batch_first=True)
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.gru(x)[0])

    model = graftkit.get_peft_model(Recurrent(), graftkit.LoraConfig(r=2, target_modules=["head"],
                                                                     modules_to_save=["gru"]))
    model.add_adapter("other", graftkit.LoraConfig(r=2, target_modules=["head"], modules_to_save=["gru"]))
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(graftkit.UnsupportedError, match="GRU.*returns a tuple"):
        model(x, adapter_names=["default", "other"])
    assert model(x, adapter_names=["other", "other"]).shape == (2, 3, 2)  # one adapter for all rows still works


def test_the_model_card_is_written_and_merged_as_peft_does(tmp_path):
    for label, lib in LIBRARIES.items():
        folder = tmp_path / label
        folder.mkdir()
        (folder / "README.md").write_text("---\nlicense: mit\n---\n\n# My notes\n\nkeep me\n")
        base = tiny_llama()
        base.config._name_or_path = "org/base-model"
        model = lib.get_peft_model(base, lib.LoraConfig(r=2, target_modules=["q_proj"]))
        model.save_pretrained(folder)
        model.save_pretrained(tmp_path / f"{label}-new")
    from huggingface_hub import ModelCard

    for label in LIBRARIES:
        kept = ModelCard.load(tmp_path / label / "README.md")
        fresh = ModelCard.load(tmp_path / f"{label}-new" / "README.md")
        for card in (kept, fresh):
            assert card.data.library_name == "peft" and card.data.base_model == "org/base-model", label
            assert "lora" in card.data.tags, label
        assert kept.data.license == "mit" and "keep me" in kept.text, label
    assert "base_model:adapter:org/base-model" in ModelCard.load(tmp_path / "graftkit-new" / "README.md").data.tags


def test_merging_what_is_merged_warns_and_changes_nothing():
    model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=2, target_modules=["q_proj"],
                                                                      init_lora_weights=False))
    model.merge_adapter()
    weight = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    with pytest.warns(UserWarning, match="merged already"):
        model.merge_adapter()
    assert torch.equal(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight, weight)


@pytest.mark.parametrize("label", list(LIBRARIES))
def test_only_one_adapter_may_train_the_shared_biases(label):
    lib = LIBRARIES[label]
    model = lib.get_peft_model(tiny_llama(attention_bias=True), lib.LoraConfig(r=2, target_modules=["q_proj"],
                                                                             bias="all"))
    with pytest.raises(ValueError, match="bias"):
        model.add_adapter("other", lib.LoraConfig(r=2, target_modules=["q_proj"], bias="lora_only"))
    model.add_adapter("third", lib.LoraConfig(r=2, target_modules=["q_proj"]))  # bias="none" is fine


@pytest.mark.parametrize("label", list(LIBRARIES))
def test_unknown_and_taken_adapter_names_are_value_errors(label):
    lib = LIBRARIES[label]
    model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError):
        model.set_adapter("nope")
    with pytest.raises(ValueError):
        model.delete_adapter("nope")
    if label == "graftkit":  # graftkit's is a KeyError too, for code that catches that
        with pytest.raises(KeyError):
            model.set_adapter("nope")


@pytest.mark.parametrize("name", ["PromptTuningConfig", "PrefixTuningConfig", "PromptEncoderConfig",
                                  "AdaptionPromptConfig"])
def test_bare_prompt_configs_build_and_are_checked_when_used(name):
    for lib in LIBRARIES.values():
        getattr(lib, name)()  # both build a bare config
    with pytest.raises(graftkit.ConfigError, match="is required to add the adapter"):
        graftkit.get_peft_model(tiny_llama(), getattr(graftkit, name)(task_type="CAUSAL_LM"))


def test_add_adapter_takes_peft_arguments_and_autocast_matches(tmp_path):
    dtypes = {}
    for label, lib in LIBRARIES.items():
        model = lib.get_peft_model(tiny_llama().to(torch.bfloat16), lib.LoraConfig(r=2, target_modules=["q_proj"]))
        model.add_adapter("kept", lib.LoraConfig(r=2, target_modules=["q_proj"]), autocast_adapter_dtype=False)
        model.add_adapter("cast", lib.LoraConfig(r=2, target_modules=["q_proj"]), low_cpu_mem_usage=False)
        dtypes[label] = {name: {p.dtype for n, p in model.named_parameters() if f".{name}." in n and "lora_A" in n}
                         for name in ("default", "kept", "cast")}
    assert dtypes["graftkit"] == dtypes["peft"] == {"default": {torch.float32}, "kept": {torch.bfloat16},
                                                    "cast": {torch.float32}}


def test_load_peft_weights_and_check_if_peft_model_match_peft(saved, tmp_path):
    from peft.helpers import check_if_peft_model as peft_check

    mapping = {r"model\.layers\.(\d+)\.self_attn": r"model.blocks.\1.attention"}
    for key_mapping in (None, mapping):
        ours = graftkit.load_peft_weights(saved, device="cpu", key_mapping=key_mapping)
        theirs = peft.load_peft_weights(str(saved), device="cpu", key_mapping=key_mapping)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert any(".blocks.0.attention." in k for k in ours)
    (tmp_path / "plain").mkdir()
    for folder in (saved, tmp_path / "plain", tmp_path / "missing"):
        assert graftkit.check_if_peft_model(folder) == peft_check(str(folder)), folder


def test_rescale_adapter_scale_matches_peft_and_restores(saved):
    from peft.helpers import rescale_adapter_scale as peft_rescale

    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(4))
    ours = graftkit.PeftModel.from_pretrained(tiny_llama(), saved)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), saved).eval()
    with torch.no_grad():
        before = ours(input_ids=ids).logits
        with graftkit.rescale_adapter_scale(ours, 0.5), peft_rescale(theirs, 0.5):
            half = ours(input_ids=ids).logits
            torch.testing.assert_close(half, theirs(input_ids=ids).logits, rtol=0, atol=1e-5)
            mixed = ours(input_ids=ids, adapter_names=["default", "__base__"]).logits
            torch.testing.assert_close(mixed[0], half[0], rtol=0, atol=1e-5)  # mixed batches rescale too
        assert not torch.allclose(half, before)
        torch.testing.assert_close(ours(input_ids=ids).logits, before, rtol=0, atol=0)
        with graftkit.disable_input_dtype_casting(ours):
            torch.testing.assert_close(ours(input_ids=ids).logits, before, rtol=0, atol=0)
    with pytest.raises(graftkit.UsageError, match="finite number"):
        with graftkit.rescale_adapter_scale(ours, float("nan")):
            pass
    assert issubclass(graftkit.PeftWarning, UserWarning)


def _status_twins(config_kwargs: dict, second: dict | None = None):
    """A graftkit and a peft model built alike (same adapters, same order)."""
    pair = {}
    for label, lib in LIBRARIES.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(**config_kwargs))
            if second is not None:
                model.add_adapter("other", lib.LoraConfig(**second))
        pair[label] = model
    return pair


def _compare(pair) -> None:
    ours, theirs = pair["graftkit"], pair["peft"]
    layers = [dataclasses.asdict(s) for s in ours.get_layer_status()]
    expected = [dataclasses.asdict(s) for s in theirs.get_layer_status()]
    for status in layers + expected:
        status.pop("module_type")  # each library's own class names
    assert layers == expected
    model, reference = dataclasses.asdict(ours.get_model_status()), dataclasses.asdict(theirs.get_model_status())
    assert model == reference


def test_layer_and_model_status_match_peft_through_a_session():
    pair = _status_twins(dict(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                         dict(r=2, target_modules=["q_proj", "v_proj"]))
    _compare(pair)
    for model in pair.values():
        model.set_adapter("other")
    _compare(pair)
    for model in pair.values():
        model.merge_adapter()
    _compare(pair)
    for model in pair.values():
        model.unmerge_adapter()
        for name, param in model.named_parameters():  # freeze one layer's weights of "other" by hand
            if "layers.0.self_attn.v_proj" in name and "other" in name:
                param.requires_grad_(False)
    _compare(pair)
    assert pair["graftkit"].get_model_status().requires_grad["other"] == "irregular"
    with pair["graftkit"].disable_adapter(), pair["peft"].disable_adapter():
        _compare(pair)
        assert pair["graftkit"].get_model_status().enabled is False
    assert [s.module_type for s in pair["graftkit"].get_layer_status()][:2] == ["lora.Linear", "lora.Linear"]


def test_status_of_a_model_without_layers_is_an_error():
    with pytest.raises(graftkit.UsageError, match="holds no adapter layers"):
        graftkit.get_model_status(tiny_llama())
    prompt = graftkit.get_peft_model(tiny_llama(), graftkit.PromptTuningConfig(num_virtual_tokens=2,
                                                                             task_type="CAUSAL_LM"))
    with pytest.raises(graftkit.UsageError, match="act on its inputs"):
        prompt.get_model_status()


@pytest.mark.parametrize("label", sorted(LIBRARIES))
def test_ensure_weight_tying_without_tied_layers_warns_and_changes_nothing(label, tmp_path):
    library = LIBRARIES[label]
    config = dict(r=2, target_modules=["q_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    plain = library.get_peft_model(tiny_llama(), library.LoraConfig(**config))
    with pytest.warns(UserWarning, match="ensure_weight_tying"):
        torch.manual_seed(0)
        tied = library.get_peft_model(tiny_llama(), library.LoraConfig(ensure_weight_tying=True, **config))
    assert plain.state_dict().keys() == tied.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, tied.state_dict()[key]), key
    tied.save_pretrained(tmp_path)  # the field is saved, and the file loads in both libraries
    for reader in LIBRARIES.values():
        with pytest.warns(UserWarning, match="ensure_weight_tying"):
            back = reader.PeftModel.from_pretrained(tiny_llama(), tmp_path)
        assert back.peft_config["default"].ensure_weight_tying is True


TIED_CONFIGS = {
    "save-head": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "save-embedding": dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
    "target-head": dict(target_modules=["q_proj", "lm_head"]),
    "target-embedding": dict(target_modules=["embed_tokens"]),
}


@pytest.mark.parametrize("case", sorted(TIED_CONFIGS))
def test_ensure_weight_tying_keeps_tied_embeddings_tied_as_peft_does(case, tmp_path):
    """On tied embeddings the adapter trains one matrix: the embedding's saved copy is the head's too, or the head
    uses the embedding's LoRA update transposed. State dicts, outputs and files agree with HF peft both ways; after
    training, the merged model's head is still its embedding and computes what the adapter did."""
    def make():
        return tiny_llama(tie_word_embeddings=True)

    made = {}
    for label, library in LIBRARIES.items():
        torch.manual_seed(0)
        config = library.LoraConfig(r=2, init_lora_weights=False, ensure_weight_tying=True,
                                    **copy.deepcopy(TIED_CONFIGS[case]))
        made[label] = library.get_peft_model(make(), config)
    ours, theirs = made["graftkit"], made["peft"]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours_config, their_config = ours.peft_config["default"], theirs.peft_config["default"]
    assert set(ours_config.target_modules) <= set(their_config.target_modules)  # the embedding named, the head not
    assert "lm_head" not in set(ours_config.target_modules) | set(ours_config.modules_to_save or [])
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = token_batch()
    expected = run(theirs.eval(), x)
    assert (expected - run(make(), x)).abs().max() > 1e-3
    torch.testing.assert_close(run(ours.eval(), x), expected, rtol=0, atol=1e-6)
    ours.save_pretrained(tmp_path / "g")
    theirs.save_pretrained(tmp_path / "p")
    torch.testing.assert_close(run(peft.PeftModel.from_pretrained(make(), tmp_path / "g").eval(), x), expected,
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(run(graftkit.PeftModel.from_pretrained(make(), tmp_path / "p"), x), expected,
                               rtol=0, atol=1e-6)
    ours.train()
    trainable = [p for p in ours.parameters() if p.requires_grad]
    losses = train_steps(ours, x, torch.optim.Adam(trainable, lr=1e-2), 4)
    assert losses[-1] < losses[0]
    inner = ours.base_model.model
    if "save" in case:  # one trained matrix, used by both
        assert inner.lm_head.modules_to_save["default"].weight is \
            inner.model.embed_tokens.modules_to_save["default"].weight
    trained = run(ours.eval(), x)
    merged = ours.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    torch.testing.assert_close(run(merged, x), trained, rtol=0, atol=1e-4)


def test_ensure_weight_tying_refusals_and_warnings():
    with pytest.raises(graftkit.UnsupportedError, match="DoRA"):
        graftkit.get_peft_model(tiny_llama(tie_word_embeddings=True), graftkit.LoraConfig(
            r=2, target_modules=["lm_head"], use_dora=True, ensure_weight_tying=True))
    with pytest.warns(UserWarning, match="nothing to tie"):  # tied, but nothing of them adapted: nothing to do
        graftkit.get_peft_model(tiny_llama(tie_word_embeddings=True), graftkit.LoraConfig(
            r=2, target_modules=["q_proj"], ensure_weight_tying=True))
    with pytest.warns(UserWarning, match="trains untied"):  # adapted tied layers without the option: warned
        graftkit.get_peft_model(tiny_llama(tie_word_embeddings=True), graftkit.LoraConfig(
            r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
