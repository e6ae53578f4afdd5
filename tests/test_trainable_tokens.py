"""The standalone trainable-tokens method: HF peft's files both ways, the maths written out, training, merging."""

from __future__ import annotations

import pytest
import torch

import graftkit
from tests.conftest import run, tiny_llama, token_batch, train_steps

IDS = [3, 5, 7]


def batch():
    x = token_batch()
    x["input_ids"][0, :3] = torch.tensor(IDS)
    return x


def adapted(tied: bool = False, **kwargs) -> graftkit.PeftModel:
    model = graftkit.get_peft_model(tiny_llama(tie_word_embeddings=tied),
                                    graftkit.TrainableTokensConfig(token_indices=IDS, **kwargs))
    with torch.no_grad():
        rows = model.base_model.model.model.embed_tokens.trainable_tokens_delta["default"]
        rows.copy_(torch.randn(rows.shape, generator=torch.Generator().manual_seed(4)))
    return model


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_rows_replace_the_embedding_rows_of_those_ids_only(tied):
    model = adapted(tied)
    rows = model.base_model.model.model.embed_tokens.trainable_tokens_delta["default"].detach()
    base = tiny_llama(tie_word_embeddings=tied)
    with torch.no_grad():  # the maths written out: the base model with those rows of the matrix replaced
        base.model.embed_tokens.weight[IDS] = rows
    x = batch()
    torch.testing.assert_close(run(model, x), run(base, x), atol=1e-5, rtol=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["base_model.model.model.embed_tokens.trainable_tokens_delta.default"]
    assert model.peft_config["default"].target_modules == "model.embed_tokens"


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_save_load_merge_and_unload(tied, tmp_path):
    model = adapted(tied)
    x = batch()
    expected = run(model, x)
    model.save_pretrained(tmp_path)
    saved = set(graftkit.load_peft_weights(str(tmp_path)))
    assert "base_model.model.model.embed_tokens.trainable_tokens_delta" in saved
    assert not any("base_layer" in k for k in saved)  # a few rows are saved, not the matrix
    loaded = graftkit.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=tied), tmp_path)
    torch.testing.assert_close(run(loaded, x), expected, atol=0, rtol=0)
    with loaded.disable_adapter():
        torch.testing.assert_close(run(loaded, x), run(tiny_llama(tie_word_embeddings=tied), x), atol=0, rtol=0)
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(run(merged, x), expected, atol=1e-5, rtol=0)


def test_training_moves_only_those_rows():
    model = adapted(init_weights=True)
    x = batch()
    before = model.base_model.model.model.embed_tokens.base_layer.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = train_steps(model, x, optimizer, 6)
    assert losses[-1] < losses[0]
    assert torch.equal(model.base_model.model.model.embed_tokens.base_layer.weight, before)


def test_bad_inputs_are_named():
    with pytest.raises(graftkit.ConfigError, match="token_indices"):
        graftkit.TrainableTokensConfig(token_indices=[1, -2])
    with pytest.raises(graftkit.ConfigError, match="empty"):
        graftkit.get_peft_model(tiny_llama(), graftkit.TrainableTokensConfig())
    with pytest.raises(graftkit.ConfigError, match="out of range"):
        graftkit.get_peft_model(tiny_llama(), graftkit.TrainableTokensConfig(token_indices=[64]))
    with pytest.raises(graftkit.TargetError, match="q_proj"):
        graftkit.get_peft_model(tiny_llama(), graftkit.TrainableTokensConfig(token_indices=[1],
                                                                           target_modules=["q_proj"]))
