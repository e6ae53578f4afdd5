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


def same_tensors(ours, theirs, rtol=0.0, atol=0.0, only_lora=False):
    """graftkit's and HF peft's state dicts hold the same tensors under the same names (adapter and base); returns
    graftkit's, keyed by HF peft's names."""
    mine = {k: v for k, v in ours.state_dict().items() if not only_lora or "lora_" in k}
    peers = {k: v for k, v in theirs.state_dict().items() if not only_lora or "lora_" in k}
    assert mine.keys() == peers.keys()
    for key, value in mine.items():
        torch.testing.assert_close(value, peers[key], rtol=rtol, atol=atol, msg=key)
    return mine


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
    mine, peers = ours.state_dict(), theirs.state_dict()
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


def test_mica_matches_peft_and_trains_a_only(tmp_path):
    """MiCA: B is the r minor left singular vectors of W (HF peft's, bit for bit), A starts at zero (the base
    function), and only A trains; B stays frozen after a reload for training too, and files move both ways."""
    x = token_batch()
    ours, theirs = both("mica")
    mine = same_tensors(ours, theirs, only_lora=True)
    w = tiny_llama().model.layers[0].self_attn.q_proj.weight.detach()
    u = torch.linalg.svd(w, full_matrices=False)[0]
    b = mine["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"]
    torch.testing.assert_close(b, u[:, -4:])
    torch.testing.assert_close(run(ours, x), run(tiny_llama(), x), rtol=0, atol=0)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n for n in trainable)
    b_before = {n: p.detach().clone() for n, p in ours.named_parameters() if "lora_B" in n}
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    ours.train()
    ours(**x, labels=x["input_ids"]).loss.backward()
    opt.step()
    for name, param in ours.named_parameters():
        if "lora_B" in name:
            assert torch.equal(param, b_before[name]), name
    assert (run(ours.eval(), x) - run(tiny_llama(), x)).abs().max() > 1e-4
    ours.save_pretrained(tmp_path)
    back = graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert {n for n, p in back.named_parameters() if p.requires_grad} == trainable
    expected = run(ours, x)
    torch.testing.assert_close(run(back.eval(), x), expected)
    torch.testing.assert_close(run(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval(), x), expected,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(graftkit.ConfigError, match="r <= min"):
        graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=200, init_lora_weights="mica"))


def test_mica_on_an_embedding_matches_peft_and_trains_a_only(tmp_path):
    """MiCA on nn.Embedding: B is the r minor left singular vectors of the (dim, vocabulary) projection the lookup
    computes, as HF peft draws them; A (the lookup table) starts at zero and is all that trains, as in HF peft."""
    x = token_batch()
    settings = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights="mica")
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**settings))
    ours = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(**settings))
    mine = same_tensors(ours, theirs, only_lora=True)
    u = torch.linalg.svd(tiny_llama().model.embed_tokens.weight.detach().T, full_matrices=False)[0]
    torch.testing.assert_close(mine["base_model.model.model.embed_tokens.lora_embedding_B.default"], u[:, -4:])
    torch.testing.assert_close(run(ours, x), run(tiny_llama(), x), rtol=0, atol=0)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert "base_model.model.model.embed_tokens.lora_embedding_A.default" in trainable
    assert not any("lora_B" in n or "lora_embedding_B" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in ours.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    ours.train()
    ours(**x, labels=x["input_ids"]).loss.backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in ours.named_parameters() if n in frozen)
    assert ours.model.model.embed_tokens.adapters["default"].lora_embedding_A.abs().max() > 0
    ours.save_pretrained(tmp_path)
    expected = run(ours.eval(), x)
    back = graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert {n for n, p in back.named_parameters() if p.requires_grad} == trainable
    torch.testing.assert_close(run(back.eval(), x), expected)
    torch.testing.assert_close(run(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval(), x), expected,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(graftkit.ConfigError, match="min.num_embeddings, embedding_dim"):
        graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=200, target_modules=["embed_tokens"],
                                                                  init_lora_weights="mica"))


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_base_becomes_its_quantized_values_and_ba_their_error(tmp_path, bits):
    """LoftQ on a float model: each adapted weight becomes exactly the values bitsandbytes stores for it, and
    s·B A (lora_alpha != r) is the rank-r SVD of W - Q, so the adapted model is closer to the original than the
    quantized base alone; with more iterations W - Q is refitted. The file reloads onto the saved base."""
    pytest.importorskip("bitsandbytes")
    from graftkit.weights import quantized_values
    x = token_batch()
    original = tiny_llama()
    reference = run(original, x)
    config = graftkit.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                 init_lora_weights="loftq", loftq_config=graftkit.LoftQConfig(loftq_bits=bits))
    model = graftkit.get_peft_model(tiny_llama(), config)
    assert model.peft_config["default"].loftq_config == {"loftq_bits": bits, "loftq_iter": 1}
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    w = original.model.layers[1].mlp.down_proj.weight.detach()
    q = quantized_values(w, bits)
    torch.testing.assert_close(layer.base_layer.weight.detach(), q, rtol=0, atol=0)
    u, sv, vh = torch.linalg.svd(w - q, full_matrices=False)
    adapter = layer.adapters["default"]
    torch.testing.assert_close(adapter.delta_weight(), (u[:, :4] * sv[:4]) @ vh[:4], rtol=1e-4, atol=1e-6)
    with model.disable_adapter():
        quantized_only = run(model, x)
    assert (run(model, x) - reference).abs().max() < (quantized_only - reference).abs().max()
    more = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(
        r=4, lora_alpha=16, target_modules=["down_proj"], init_lora_weights="loftq",
        loftq_config={"loftq_bits": bits, "loftq_iter": 3}))
    refit = more.base_model.model.model.layers[1].mlp.down_proj
    assert not torch.equal(refit.base_layer.weight, layer.base_layer.weight)  # Q = quant(W - s·BA) after step 1
    expected = run(model, x)
    model.save_pretrained(tmp_path / "adapter")
    model.unload().save_pretrained(tmp_path / "base")  # the quantized values, for loading in 4/8 bits later
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    torch.testing.assert_close(base.model.layers[1].mlp.down_proj.weight, q, rtol=0, atol=0)
    back = graftkit.PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(run(back, x), expected, rtol=1e-5, atol=1e-6)


def test_loftq_errors():
    with pytest.raises(graftkit.ConfigError, match="loftq_bits 4 or 8"):
        graftkit.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 2})
    with pytest.raises(graftkit.ConfigError, match="set init_lora_weights='loftq'"):
        graftkit.LoraConfig(loftq_config={"loftq_bits": 4})
    with pytest.raises(graftkit.UnsupportedError, match="nn.Embedding"):
        graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(target_modules=["embed_tokens"],
                                                                  init_lora_weights="loftq"))


def _two_batches(model, x):
    def step():
        for _ in range(2):
            model(**x, labels=x["input_ids"]).loss.backward()
    return step


@pytest.mark.parametrize("direction, scale", [("ArB2r", "stable"), ("random", "weight_svd"), ("ArBr", "gd_scale"),
                                              ("A2rBr", "unit")])
def test_lora_ga_matches_peft(tmp_path, direction, scale):
    """LoRA-GA: from the same gradients (preprocess_loraga with the same train step) and seed, HF peft's A, B and
    residual base exactly, the base function at the start; the files move both ways and convert to a plain
    adapter for the original base."""
    x = token_batch()
    made = {}
    for library in (peft, graftkit):
        model = tiny_llama()
        cfg = config(library, "lora_ga", lora_ga_config=library.LoraGAConfig(direction=direction, scale=scale))
        library.preprocess_loraga(model, cfg, _two_batches(model, x))
        torch.manual_seed(0)
        made[library.__name__] = library.get_peft_model(model, cfg)
    ours, theirs = made["graftkit"], made["peft"]
    mine = same_tensors(ours, theirs)
    b = mine["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"]
    assert torch.count_nonzero(b) == b.numel()  # B from the gradient, not the zero default
    torch.testing.assert_close(run(ours, x), run(tiny_llama(), x), rtol=1e-5, atol=1e-6)
    assert not any(hasattr(m, "_graftkit_loraga_grad") for m in ours.modules())
    ours.save_pretrained(tmp_path / "init")  # before training
    randomize_adapters(ours)
    expected = run(ours, x)
    ours.save_pretrained(tmp_path / "ga")
    torch.testing.assert_close(run(peft.PeftModel.from_pretrained(theirs.unload(), tmp_path / "ga").eval(), x),
                               expected, rtol=1e-5, atol=1e-6)
    ours.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "init")
    torch.testing.assert_close(run(graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "plain"), x),
                               expected, rtol=1e-5, atol=1e-5)


def test_lora_ga_preprocessing_cache_and_errors(tmp_path):
    x = token_batch()
    cfg = config(graftkit, "lora_ga")
    model = tiny_llama()
    model.eval()
    model.lm_head.weight.requires_grad_(False)
    graftkit.preprocess_loraga(model, cfg, _two_batches(model, x), cache_file=tmp_path / "grads.pt")
    assert not model.training and not model.lm_head.weight.requires_grad and model.model.norm.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    first = graftkit.get_peft_model(model, cfg).state_dict()
    again = tiny_llama()
    graftkit.preprocess_loraga(again, cfg, lambda: pytest.fail("the cache should be used"),
                               cache_file=tmp_path / "grads.pt")
    second = graftkit.get_peft_model(again, cfg).state_dict()
    for key, value in first.items():
        torch.testing.assert_close(second[key], value, rtol=0, atol=0, msg=key)
    theirs = tiny_llama()  # HF peft reads the same cache file
    peft.preprocess_loraga(theirs, config(peft, "lora_ga", lora_ga_config=peft.LoraGAConfig()),
                           lambda: pytest.fail("the cache should be used"), cache_file=str(tmp_path / "grads.pt"))
    assert torch.equal(theirs.model.layers[0].self_attn.q_proj._peft_loraga_grad,
                       torch.load(tmp_path / "grads.pt")["model.layers.0.self_attn.q_proj._peft_loraga_grad"])
    with pytest.raises(graftkit.UsageError, match="preprocess_loraga"):
        graftkit.get_peft_model(tiny_llama(), cfg)
    with pytest.raises(graftkit.UsageError, match="no backward pass"):
        graftkit.preprocess_loraga(tiny_llama(), cfg, lambda: None)

    def broken():
        raise RuntimeError("out of data")
    model = tiny_llama()
    with pytest.raises(RuntimeError, match="out of data"):
        graftkit.preprocess_loraga(model, cfg, broken)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(graftkit.ConfigError, match="lora_ga"):
        graftkit.preprocess_loraga(tiny_llama(), config(graftkit, True), lambda: None)
    with pytest.raises(graftkit.ConfigError, match="direction"):
        graftkit.LoraConfig(init_lora_weights="lora_ga", lora_ga_config={"direction": "up"})


def _peft_corda():
    pytest.importorskip("attr")  # HF peft's CorDA module imports attrs without declaring it
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda
    return CordaConfig, preprocess_corda


def _samples(model):
    batches = [token_batch(seed=s, batch=1, length=9) for s in range(3)]

    def run_model():
        for batch in batches:
            model(**batch)
    return run_model


@pytest.mark.parametrize("arch, method", [("llama", "ipm"), ("gpt2", "kpm")])
def test_corda_matches_peft(tmp_path, arch, method):
    """CorDA: from the same sample data, HF peft's A, B and residual base exactly (the top r or bottom r directions
    of the context-oriented decomposition; GPT-2's Conv1D included), the base function at the start; the
    decomposition cache moves between the two libraries."""
    peft_corda_config, peft_preprocess = _peft_corda()
    make, targets = ((tiny_llama, ["q_proj", "v_proj", "down_proj"]) if arch == "llama"
                     else (tiny_gpt2, ["c_attn", "c_fc"]))
    x = token_batch(batch=1, length=9)
    made, caches = {}, {}
    for library, corda_config, preprocess in ((peft, peft_corda_config, peft_preprocess),
                                              (graftkit, graftkit.CordaConfig, graftkit.preprocess_corda)):
        model = make()
        caches[library.__name__] = tmp_path / f"{library.__name__}.pt"
        cfg = library.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="corda",
                                 corda_config=corda_config(corda_method=method,
                                                           cache_file=str(caches[library.__name__])))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            preprocess(model, cfg, _samples(model))
            made[library.__name__] = library.get_peft_model(model, cfg)
    ours, theirs = made["graftkit"], made["peft"]
    same_tensors(ours, theirs)
    torch.testing.assert_close(run(ours, x), run(make(), x), rtol=1e-5, atol=1e-6)
    # each library reads the other's cache (no data needed) and builds the same adapter
    cfg = graftkit.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="corda",
                              corda_config={"corda_method": method, "cache_file": str(caches["peft"])})
    model = make()
    graftkit.preprocess_corda(model, cfg)
    again = graftkit.get_peft_model(model, cfg).state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0, msg=key)
    model = make()
    theirs_cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="corda",
                                 corda_config=peft_corda_config(corda_method=method,
                                                                cache_file=str(caches["graftkit"])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_preprocess(model, theirs_cfg)
        from_ours = peft.get_peft_model(model, theirs_cfg).state_dict()
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(from_ours[key], value, rtol=0, atol=0, msg=key)


def test_corda_errors_and_files(tmp_path):
    x = token_batch(batch=1, length=9)
    cfg = config(graftkit, "corda", corda_config={"covariance_file": str(tmp_path / "cov.pt")})
    model = tiny_llama()
    graftkit.preprocess_corda(model, cfg, _samples(model))
    assert (tmp_path / "cov.pt").is_file() and not model.training
    first = graftkit.get_peft_model(model, cfg)
    assert not any(hasattr(m, "_graftkit_corda_eigens") for m in first.modules())
    first.save_pretrained(tmp_path / "init")
    randomize_adapters(first)
    expected = run(first, x)
    first.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "init")
    for library in (graftkit, peft):  # a plain rank-2r adapter for the original base
        back = library.PeftModel.from_pretrained(tiny_llama(), tmp_path / "plain")
        torch.testing.assert_close(run(back.eval(), x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(graftkit.UsageError, match="preprocess_corda"):
        graftkit.get_peft_model(tiny_llama(), cfg)
    with pytest.raises(graftkit.UsageError, match="run_model"):
        graftkit.preprocess_corda(tiny_llama(), config(graftkit, "corda"))
    with pytest.raises(graftkit.UsageError, match="no input"):
        graftkit.preprocess_corda(tiny_llama(), config(graftkit, "corda"), lambda: None)
    other_rank = graftkit.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights="corda",
                                     corda_config={"cache_file": str(tmp_path / "r4.pt")})
    model = tiny_llama()
    graftkit.preprocess_corda(model, config(graftkit, "corda", corda_config={"cache_file": str(tmp_path / "r4.pt")}),
                              _samples(model))
    model = tiny_llama()
    graftkit.preprocess_corda(model, other_rank)
    with pytest.raises(graftkit.ConfigError, match="rank 4"):
        graftkit.get_peft_model(model, other_rank)
    (tmp_path / "bad.pt").write_bytes(b"not a cache")
    with pytest.raises(graftkit.CheckpointError, match="bad.pt"):
        graftkit.preprocess_corda(tiny_llama(), config(graftkit, "corda",
                                                       corda_config={"cache_file": str(tmp_path / "bad.pt")}))
    with pytest.raises(graftkit.ConfigError, match="corda_method"):
        graftkit.LoraConfig(init_lora_weights="corda", corda_config={"corda_method": "both"})


def _eva_batches():
    batches = [dict(token_batch(seed=s, batch=2, length=12)) for s in range(4)]
    for batch in batches:
        batch["labels"] = batch["input_ids"].clone()
        batch["labels"][:, :3] = -100  # masked prompt positions do not count
    return batches


EVA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("r, rho, tau", [(2, 3.0, 0.9), (3, 2.0, 0.95), (1, 6.0, 0.9)])
def test_eva_matches_peft(tmp_path, r, rho, tau):
    """EVA: the same principal directions (incremental PCA over the same batches, to the same convergence), the same
    rank redistribution (layers dropped at rank 0, alphas scaled with their rank) and the same config as HF peft; the
    base function at the start; files both ways."""
    made = {}
    for library in (peft, graftkit):
        torch.manual_seed(0)
        model = library.get_peft_model(tiny_llama(), library.LoraConfig(
            r=r, lora_alpha=8, target_modules=EVA_TARGETS, init_lora_weights="eva",
            eva_config=library.EvaConfig(rho=rho, tau=tau)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            library.initialize_lora_eva_weights(model, _eva_batches(), show_progress_bar=False)
        made[library.__name__] = model
    ours, theirs = made["graftkit"], made["peft"]
    same_tensors(ours, theirs, rtol=1e-5, atol=1e-6)
    ours_config, theirs_config = ours.peft_config["default"], theirs.peft_config["default"]
    assert ours_config.rank_pattern == theirs_config.rank_pattern
    assert ours_config.alpha_pattern == theirs_config.alpha_pattern
    assert sorted(ours_config.target_modules) == sorted(theirs_config.target_modules)
    x = token_batch()
    torch.testing.assert_close(run(ours, x), run(tiny_llama(), x), rtol=0, atol=0)  # B is zero
    if r == 2:
        assert ours_config.rank_pattern  # the ranks were redistributed
    if r == 1:
        assert len(ours_config.target_modules) < 14  # some layer got rank 0 and lost its adapter
    randomize_adapters(ours)
    expected = run(ours, x)
    ours.save_pretrained(tmp_path)
    torch.testing.assert_close(run(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval(), x), expected,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run(graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path), x), expected)


def test_eva_state_dict_of_a_plain_model_and_errors():
    """get_eva_state_dict on a model without adapters (config given) equals HF peft's; whitening divides each
    direction by the square root of its singular value once."""
    cfg = dict(r=2, lora_alpha=8, target_modules=["o_proj", "down_proj"], init_lora_weights="eva")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_eva_state_dict(tiny_llama(), _eva_batches(), peft.LoraConfig(**cfg),
                                         show_progress_bar=False)
    ours = graftkit.get_eva_state_dict(tiny_llama(), _eva_batches(), graftkit.LoraConfig(**cfg))
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-6, msg=key)
    whitened = graftkit.get_eva_state_dict(tiny_llama(), _eva_batches(), graftkit.LoraConfig(
        **cfg, eva_config={"whiten": True}))
    for key, value in ours.items():
        ratio = whitened[key] / value
        assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4)  # one factor per direction
    model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=2, target_modules=["o_proj"]))
    with pytest.raises(graftkit.UsageError, match="init_lora_weights='eva'"):
        graftkit.initialize_lora_eva_weights(model, _eva_batches())
    eva_model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(**cfg))
    with pytest.raises(graftkit.UsageError, match="dataloader"):
        graftkit.initialize_lora_eva_weights(eva_model)
    with pytest.raises(graftkit.UsageError, match="empty"):
        graftkit.initialize_lora_eva_weights(eva_model, [])
    with pytest.raises(graftkit.ConfigError, match="rho"):
        graftkit.LoraConfig(init_lora_weights="eva", eva_config={"rho": 0.5})
