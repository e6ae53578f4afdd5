"""Many adapters on one model, against HF peft on the same weights: switching, trainability, merging,
weighted combinations and mixed-adapter batches."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import graftkit
from graftkit.layer import AdaptedLayer
from tests.conftest import randomize_adapters, run, tiny_bert_cls, tiny_convnet, tiny_gpt2, tiny_llama, token_batch

peft = pytest.importorskip("peft")


def quiet():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore")
    return ctx


def twins(tmp_path, build=tiny_llama, configs=None, seed=3):
    """A graftkit model and a peft model with the same adapters ("a", "b", ...) and the same weights."""
    configs = configs or {
        "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj"]),
    }
    names = list(configs)
    ours = graftkit.get_peft_model(build(), graftkit.LoraConfig(init_lora_weights=False, **configs[names[0]]),
                                   adapter_name=names[0])
    for name in names[1:]:
        ours.add_adapter(name, graftkit.LoraConfig(init_lora_weights=False, **configs[name]))
    randomize_adapters(ours, seed=seed)
    ours.eval()
    ours.save_pretrained(tmp_path)
    ctx = quiet()
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path / names[0], adapter_name=names[0])
    for name in names[1:]:
        theirs.load_adapter(tmp_path / name, adapter_name=name)
    ctx.__exit__(None, None, None)
    return ours, theirs.eval()


def test_switching_matches_peft_and_disable_is_bit_exact(tmp_path):
    ours, theirs = twins(tmp_path)
    x = token_batch()
    base = run(tiny_llama(), x)
    for name in ("a", "b", "a"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        assert ours.active_adapter == name and ours.active_adapters == [name]
        torch.testing.assert_close(run(ours, x), run(theirs, x), atol=1e-5, rtol=0)
        with ours.disable_adapter():
            assert torch.equal(run(ours, x), base)
    ours.disable_adapter_layers()
    assert torch.equal(run(ours, x), base)
    ours.enable_adapter_layers()
    assert not torch.equal(run(ours, x), base)
    # Several active adapters add up, as in peft's tuner-level set_adapter.
    ours.set_adapter(["a", "b"])
    theirs.base_model.set_adapter(["a", "b"])
    torch.testing.assert_close(run(ours, x), run(theirs, x), atol=1e-5, rtol=0)
    assert set(ours.peft_config) == {"a", "b"} and ours.peft_config["b"].r == 4


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_trainability_follows_peft(tmp_path):
    ctx = quiet()
    cfg = dict(r=2, target_modules=["q_proj"])
    ours = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(**cfg), adapter_name="a")
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**cfg), adapter_name="a")
    steps = [
        ("add b", lambda m, lib: m.add_adapter("b", (graftkit if lib == "ours" else peft).LoraConfig(**cfg))),
        ("set b", lambda m, lib: m.set_adapter("b")),
        ("save+load c", lambda m, lib: (m.save_pretrained(tmp_path / lib), m.load_adapter(tmp_path / lib / "b", "c"))),
        ("set c", lambda m, lib: m.set_adapter("c")),
        ("delete c", lambda m, lib: m.delete_adapter("c")),
    ]
    for label, step in steps:
        step(ours, "ours")
        step(theirs, "peft")
        assert _trainable(ours) == _trainable(theirs), label
        assert ours.active_adapters == list(theirs.active_adapters), label
    ctx.__exit__(None, None, None)
    frozen = graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours" / "b", adapter_name="b")
    assert frozen.get_nb_trainable_parameters()[0] == 0
    frozen.set_adapter("b")
    assert frozen.get_nb_trainable_parameters()[0] > 0


def test_save_all_adapters_and_reload_each(tmp_path):
    ours, peft_model = twins(tmp_path / "first")
    x = token_batch()
    expected = {}
    for name in ("a", "b"):
        ours.set_adapter(name)
        expected[name] = run(ours, x)
    ours.save_pretrained(tmp_path / "all")
    assert (tmp_path / "all" / "a" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "all" / "b" / "adapter_config.json").is_file()
    loaded = graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "all" / "a", adapter_name="a")
    loaded.load_adapter(tmp_path / "all" / "b", adapter_name="b")
    for name in ("a", "b"):
        loaded.set_adapter(name)
        torch.testing.assert_close(run(loaded, x), expected[name], atol=1e-6, rtol=0)
    ours.save_pretrained(tmp_path / "only", selected_adapters=["b"])
    peft_model.save_pretrained(tmp_path / "peft-only", selected_adapters=["b"])  # the card goes to the top, as peft's
    assert sorted(p.name for p in (tmp_path / "only").iterdir()) == ["README.md", "b"]
    assert sorted(p.name for p in (tmp_path / "peft-only").iterdir()) == ["README.md", "b"]


def test_merge_unmerge_round_trip_and_merge_several(tmp_path):
    ours, theirs = twins(tmp_path)
    x = token_batch()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ours.set_adapter(["a", "b"])
    both = run(ours, x)
    ours.merge_adapter()
    torch.testing.assert_close(run(ours, x), both, atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=0)
    with pytest.raises(graftkit.GraftkitError, match="merged"):
        ours.merge_adapter(["a"])
        ours(**x, adapter_names=["a", "b"])
    ours.unmerge_adapter()
    merged = copy.deepcopy(ours).merge_and_unload(adapter_names=["a", "b"])
    ctx = quiet()
    theirs_merged = theirs.merge_and_unload(adapter_names=["a", "b"])
    ctx.__exit__(None, None, None)
    torch.testing.assert_close(run(merged, x), run(theirs_merged, x), atol=1e-5, rtol=0)
    torch.testing.assert_close(run(merged, x), both, atol=1e-5, rtol=0)


COMBOS = [
    ("linear", {}), ("cat", {}), ("svd", {}), ("svd", {"svd_rank": 3, "svd_clamp": 0.9}), ("ties", {"density": 0.5}),
    ("ties", {"density": 0.6, "majority_sign_method": "frequency"}), ("dare_linear", {"density": 0.5}),
    ("dare_ties", {"density": 0.7}), ("magnitude_prune", {"density": 0.5}), ("ties_svd", {"density": 0.5}),
    ("dare_linear_svd", {"density": 0.5}), ("magnitude_prune_svd", {"density": 0.4}),
]


@pytest.mark.parametrize("combination, options", COMBOS, ids=[f"{c}-{i}" for i, (c, _) in enumerate(COMBOS)])
def test_add_weighted_adapter_matches_peft(tmp_path, combination, options):
    configs = {"a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
               "b": dict(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj"])}
    ours, theirs = twins(tmp_path, configs=configs)
    x = token_batch()
    weights = [0.7, -0.4]
    # DARE draws random masks; the libraries spend different amounts of the global RNG on initialising the
    # new adapter, so both get their masks from one dedicated generator, seeded the same way.
    bernoulli = torch.bernoulli

    def run_with_masks(fn):
        g = torch.Generator().manual_seed(0)
        torch.bernoulli = lambda t, *a, **k: bernoulli(t, generator=g)
        try:
            fn()
        finally:
            torch.bernoulli = bernoulli

    run_with_masks(lambda: ours.add_weighted_adapter(["a", "b"], weights, "mix", combination_type=combination,
                                                     **options))
    ctx = quiet()
    run_with_masks(lambda: theirs.add_weighted_adapter(["a", "b"], weights, "mix", combination_type=combination,
                                                       **options))
    ctx.__exit__(None, None, None)
    ours.set_adapter("mix")
    theirs.set_adapter("mix")
    out = run(ours, x)
    assert (out - run(tiny_llama(), x)).abs().max() > 1e-4
    torch.testing.assert_close(out, run(theirs, x), atol=1e-5, rtol=0)
    assert ours.peft_config["mix"].r == theirs.peft_config["mix"].r


def test_add_weighted_adapter_errors(tmp_path):
    ours, _ = twins(tmp_path, configs={"a": dict(r=2, target_modules=["q_proj"]),
                                       "b": dict(r=4, target_modules=["q_proj"])})
    with pytest.raises(graftkit.ConfigError, match=r"ranks \[2, 4\]"):
        ours.add_weighted_adapter(["a", "b"], [1, 1], "x", combination_type="linear")
    with pytest.raises(graftkit.ConfigError, match="unknown combination_type"):
        ours.add_weighted_adapter(["a", "b"], [1, 1], "x", combination_type="average")
    with pytest.raises(graftkit.AdapterNameError, match="nope"):
        ours.add_weighted_adapter(["a", "nope"], [1, 1], "x")
    with pytest.raises(graftkit.ConfigError, match="needs density"):
        ours.add_weighted_adapter(["a", "b"], [1, 1], "x", combination_type="ties_svd")
    assert "x" not in ours.peft_config  # a failed combination leaves no adapter behind
    assert not any("adapters.x." in n for n, _ in ours.named_parameters())


MIXED = {
    "llama": (tiny_llama, None, {"a": dict(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"]),
                                 "b": dict(r=8, lora_alpha=4, target_modules=["q_proj", "up_proj"]),
                                 "c": dict(r=2, target_modules=["v_proj"], use_dora=True)}),
    "gpt2": (tiny_gpt2, None, {"a": dict(r=4, target_modules=["c_attn"]), "b": dict(r=2, target_modules=["c_fc"]),
                               "c": dict(r=4, target_modules=["c_attn", "c_proj"])}),
    "bert-cls": (tiny_bert_cls, None, {"a": dict(r=4, task_type="SEQ_CLS"), "b": dict(r=2, task_type="SEQ_CLS"),
                                       "c": dict(r=4, target_modules=["key"], task_type="SEQ_CLS")}),
    "conv": (tiny_convnet, "image", {"a": dict(r=2, target_modules=["conv", "head"]),
                                     "b": dict(r=4, target_modules=["conv1x1"]),
                                     "c": dict(r=2, target_modules=["head"])}),
}


@pytest.mark.parametrize("case", sorted(MIXED))
def test_mixed_batch_rows_equal_single_adapter_and_peft(tmp_path, case):
    build, kind, configs = MIXED[case]
    ours, theirs = twins(tmp_path, build=build, configs=configs)
    if kind == "image":
        x = torch.randn(6, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    else:
        x = token_batch(batch=6)
    names = ["a", "__base__", "b", "c", "a", "b"]
    with torch.no_grad():
        mixed = ours(x, adapter_names=names) if kind == "image" else ours(**x, adapter_names=names).logits
    if not any(c.get("use_dora") for c in configs.values()):  # peft refuses DoRA in mixed batches; we serve it
        with torch.no_grad():
            theirs_mixed = theirs(x, adapter_names=names) if kind == "image" else (
                theirs(**x, adapter_names=names).logits)
        torch.testing.assert_close(mixed, theirs_mixed, atol=1e-5, rtol=0)
    for i, name in enumerate(names):
        row = x[i : i + 1] if kind == "image" else {k: v[i : i + 1] for k, v in x.items()}
        if name == "__base__":
            with ours.disable_adapter():
                single = run(ours, row)
        else:
            ours.set_adapter(name)
            single = run(ours, row)
        torch.testing.assert_close(mixed[i : i + 1], single, atol=1e-5, rtol=0)
    assert all(getattr(m, "routing", None) is None for m in ours.modules()), "routing is cleared after the call"


def test_mixed_batch_generate_and_beams(tmp_path):
    ours, theirs = twins(tmp_path)
    for m in (ours, theirs):
        m.base_model.model.generation_config.pad_token_id = 0
    ids = token_batch(batch=3)["input_ids"]
    names = ["b", "a", "__base__"]
    for kwargs in (dict(do_sample=False), dict(do_sample=False, num_beams=2)):
        out = ours.generate(input_ids=ids, max_new_tokens=4, adapter_names=names, **kwargs)
        ctx = quiet()
        ref = theirs.generate(input_ids=ids, max_new_tokens=4, adapter_names=names, **kwargs)
        ctx.__exit__(None, None, None)
        assert torch.equal(out, ref)
        for i, name in enumerate(names):
            if name == "__base__":
                with ours.disable_adapter():
                    single = ours.generate(input_ids=ids[i : i + 1], max_new_tokens=4, **kwargs)
            else:
                ours.set_adapter(name)
                single = ours.generate(input_ids=ids[i : i + 1], max_new_tokens=4, **kwargs)
            assert torch.equal(out[i : i + 1], single)


def test_mixed_batch_errors(tmp_path):
    ours, _ = twins(tmp_path)
    x = token_batch(batch=2)
    with pytest.raises(graftkit.AdapterNameError, match="zzz"):
        ours(**x, adapter_names=["a", "zzz"])
    with pytest.raises(graftkit.GraftkitError, match="one adapter name per input row"):
        ours(**x, adapter_names=["a", "b", "a"])
    with pytest.raises(graftkit.AdapterNameError, match="reserved"):
        ours.add_adapter("__base__", graftkit.LoraConfig(r=2))
    assert all(m.routing is None for m in ours.modules() if isinstance(m, AdaptedLayer))


def test_mixed_batch_uses_batched_matmuls_for_linear(tmp_path, monkeypatch):
    """No per-adapter loop for LoRA on linear layers: the grouped fallback must not run."""
    ours, _ = twins(tmp_path)
    import graftkit.layer as layer_mod

    def fail(*args, **kwargs):
        raise AssertionError("grouped fallback used for plain LoRA linear layers")

    monkeypatch.setattr(layer_mod, "grouped_forward", fail)
    with torch.no_grad():
        ours(**token_batch(batch=4), adapter_names=["a", "b", "__base__", "a"])


@pytest.mark.parametrize("case", ["gpt2", "conv"])
@pytest.mark.parametrize("combination, options", [("svd", {}), ("cat", {}), ("dare_linear_svd", {"density": 0.6}),
                                                  ("ties", {"density": 0.5})])
def test_add_weighted_adapter_other_layer_kinds(tmp_path, case, combination, options):
    build, kind, configs = MIXED[case]
    configs = {"a": configs["a"], "b": {**configs["c"], "r": configs["a"]["r"]}}
    ours, theirs = twins(tmp_path, build=build, configs=configs)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(2)) if kind == "image" else token_batch()
    bernoulli = torch.bernoulli
    for model in (ours, theirs):
        g = torch.Generator().manual_seed(0)
        torch.bernoulli = lambda t, *a, g=g, **k: bernoulli(t, generator=g)
        try:
            ctx = quiet()
            model.add_weighted_adapter(["a", "b"], [0.6, 0.8], "mix", combination_type=combination, **options)
            ctx.__exit__(None, None, None)
        finally:
            torch.bernoulli = bernoulli
        model.set_adapter("mix")
    torch.testing.assert_close(run(ours, x), run(theirs, x), atol=1e-5, rtol=0)
