"""Every fast path against the plain path: outputs and gradients, fp32 (1e-5) and bf16."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graftkit
from graftkit.kernels import lora as fused_lora
from tests.conftest import randomize_adapters, tiny_llama, token_batch


def _layer(dtype, bias=True, init=False):
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=bias).to(dtype)
    model = nn.Sequential(base)
    graftkit.inject_adapter_in_model(graftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["0"],
                                                         bias="all" if bias else "none"), model)
    if not init:
        randomize_adapters(model)
    return model


def _run_both(make_input, dtype, bias=True, x_grad=True):
    results = []
    for enabled in (True, False):
        fused_lora.ENABLED = enabled
        try:
            model = _layer(dtype, bias)
            x = make_input().to(dtype)
            if x_grad:
                x.requires_grad_(True)
            out = model(x)
            (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            results.append((out.detach(), x.grad.clone() if x_grad else None, grads))
        finally:
            fused_lora.ENABLED = True
    return results


INPUTS = {
    "3d": lambda: torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(1)),
    "2d": lambda: torch.randn(7, 24, generator=torch.Generator().manual_seed(1)),
    "non-contiguous": lambda: torch.randn(5, 2, 24, generator=torch.Generator().manual_seed(1)).transpose(0, 1),
}


@pytest.mark.parametrize("shape", sorted(INPUTS))
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["trainable-bias", "no-bias"])
def test_fused_lora_linear_equals_plain_path(shape, dtype, tol, bias):
    (out_f, dx_f, g_f), (out_p, dx_p, g_p) = _run_both(INPUTS[shape], dtype, bias)
    assert out_f.dtype == dtype
    torch.testing.assert_close(out_f.float(), out_p.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(dx_f.float(), dx_p.float(), atol=tol, rtol=tol)
    assert g_f.keys() == g_p.keys() and len(g_f) == (3 if bias else 2)
    for name in g_f:  # gradients of A, B (and the trainable bias), relative to their scale
        scale = g_p[name].float().abs().max().item()
        torch.testing.assert_close(g_f[name].float(), g_p[name].float(), atol=tol * max(1.0, scale), rtol=tol)


def test_fused_path_without_input_grad():
    (out_f, _, g_f), (out_p, _, g_p) = _run_both(INPUTS["3d"], torch.float32, x_grad=False)
    torch.testing.assert_close(out_f, out_p, atol=1e-5, rtol=0)
    for name in g_f:
        torch.testing.assert_close(g_f[name], g_p[name], atol=1e-5, rtol=1e-5)


def _count_fused(monkeypatch):
    calls = []
    original = fused_lora.FusedLoraLinear.apply

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(fused_lora.FusedLoraLinear, "apply", counting)
    return calls


def test_whole_model_uses_fused_path_and_matches_plain(monkeypatch):
    calls = _count_fused(monkeypatch)
    model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model)
    model.train()
    x = token_batch()
    loss = model(**x, labels=x["input_ids"]).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(calls) == 14  # 7 linear layers x 2 decoder layers
    fused_lora.ENABLED = False
    try:
        model.zero_grad()
        loss_plain = model(**x, labels=x["input_ids"]).loss
        loss_plain.backward()
    finally:
        fused_lora.ENABLED = True
    torch.testing.assert_close(loss, loss_plain, atol=1e-6, rtol=0)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", ["dora", "dropout-training", "hook", "two-active"])
def test_fused_path_is_skipped_where_not_exact(monkeypatch, case):
    calls = _count_fused(monkeypatch)
    kwargs = dict(r=4, target_modules=["q_proj"])
    if case == "dora":
        kwargs["use_dora"] = True
    if case == "dropout-training":
        kwargs["lora_dropout"] = 0.3
    model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(**kwargs))
    if case == "hook":
        model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.register_forward_hook(lambda *a: None)
    if case == "two-active":
        model.add_adapter("other", graftkit.LoraConfig(r=2, target_modules=["q_proj"]))
        model.set_adapter(["default", "other"])
    model.train()
    model(**token_batch())
    expected = {"hook": 1}.get(case, 0)  # with a hook only the hooked layer leaves the fused path
    assert len(calls) == expected


def test_autocast_training_takes_the_plain_path(monkeypatch):
    calls = _count_fused(monkeypatch)
    model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=4, target_modules="all-linear")).train()
    x = token_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**x, labels=x["input_ids"]).loss
    loss.backward()
    assert calls == [] and torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)
