"""LoRA+ and LoRA-FA optimizers: the same parameter groups as HF peft's, and LoRA-FA's step against its maths."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import graftkit
from graftkit.optimizers import create_lorafa_optimizer, create_loraplus_optimizer
from tests.conftest import tiny_llama, token_batch, train_steps

peft = pytest.importorskip("peft")
from peft.optimizers import create_lorafa_optimizer as peft_lorafa  # noqa: E402
from peft.optimizers import create_loraplus_optimizer as peft_loraplus  # noqa: E402

KWARGS = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "embed_tokens"], use_dora=True,
              bias="lora_only", modules_to_save=["lm_head"])


def both(**overrides):
    config = {**KWARGS, **overrides}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(attention_bias=True), peft.LoraConfig(**config))
    ours = graftkit.get_peft_model(tiny_llama(attention_bias=True), graftkit.LoraConfig(**config))
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def groups(optimizer, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return [(sorted(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"]) for g in optimizer.param_groups]


def test_loraplus_groups_match_peft():
    theirs, ours = both()
    options = dict(lr=2e-4, loraplus_lr_ratio=16, loraplus_lr_embedding=1e-5, loraplus_weight_decay=0.01)
    mine = groups(create_loraplus_optimizer(ours, torch.optim.AdamW, **options), ours)
    assert mine == groups(peft_loraplus(theirs, torch.optim.AdamW, **options), theirs)
    a, embedding, b, b_no_decay = mine
    assert any(".lora_A." in n for n in a[0]) and b[1] == pytest.approx(2e-4 * 16) and b_no_decay[2] == 0.0
    assert embedding[0] and all("embed_tokens.lora_embedding" in n for n in embedding[0])
    assert any("lora_magnitude_vector" in n for n in b[0]) and any(n.endswith("bias") for n in b_no_decay[0])
    with pytest.raises(graftkit.ConfigError, match="loraplus_lr_ratio"):
        create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=float("nan"))


def test_loraplus_trains():
    _, model = both(use_dora=False, modules_to_save=None)
    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=2e-2, loraplus_lr_ratio=8)
    losses = train_steps(model, token_batch(), optimizer, 15)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.03, losses


def lorafa_pair():
    theirs, ours = both(use_dora=False, bias="none", modules_to_save=None,
                        target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 2})
    return theirs, ours


def test_lorafa_step_is_the_projected_adamw_step_and_matches_peft():
    theirs, ours = lorafa_pair()
    with torch.no_grad():  # non-zero B so that A's inverse and B's update are both exercised
        for model in (theirs, ours):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    mine = create_lorafa_optimizer(ours, r=4, lora_alpha=8, lr=1e-2, weight_decay=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft_lorafa(theirs, r=4, lora_alpha=8, lr=1e-2, weight_decay=0.1)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "lora_A" in n)
    x = token_batch()
    for model in (ours, theirs):
        model(**x, labels=x["input_ids"]).loss.backward()
    layer = ours.base_model.model.model.layers[0].mlp.down_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scale = 8 / 2  # rank 2 there, alpha 8
    grad = b.grad @ torch.linalg.pinv(a @ a.T + 1e-8 * torch.eye(2)) / scale**2
    # One AdamW step from zero moments: m = (1-β1) g, v = (1-β2) g², step lr·√(1-β2)/(1-β1).
    m, v = 0.1 * grad, 0.001 * grad**2
    expected = b - 1e-2 * math.sqrt(0.001) / 0.1 * m / (v.sqrt() + 1e-6)
    expected = expected - 1e-2 * 0.1 * expected
    mine.step()
    reference.step()
    torch.testing.assert_close(b, expected.detach(), rtol=1e-5, atol=1e-6)
    theirs_b = theirs.base_model.model.model.layers[0].mlp.down_proj.lora_B["default"].weight
    torch.testing.assert_close(b, theirs_b, rtol=0, atol=2e-3)  # HF peft projects in bfloat16 on CPU


def test_lorafa_trains_and_its_state_round_trips():
    _, model = lorafa_pair()
    optimizer = create_lorafa_optimizer(model, r=4, lora_alpha=8, lr=5e-2)
    losses = train_steps(model, token_batch(), optimizer, 15)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.03, losses
    again = create_lorafa_optimizer(model, r=4, lora_alpha=8, lr=5e-3)
    again.load_state_dict(optimizer.state_dict())
    assert all(again.state[p]["step"] == 15 for p in again.param_groups[0]["params"] if p.requires_grad)
    with pytest.raises(graftkit.ConfigError, match="use_rslora"):
        create_lorafa_optimizer(model, r=4, lora_alpha=8, lr=1e-3, use_rslora=True)
