"""One matrix for every method: save/load, disable, switch, train. A new method adds one line to ``METHODS``."""

from __future__ import annotations

import pytest
import torch

import graftkit
from tests.conftest import randomize_adapters, run, tiny_llama, token_batch

METHODS = {
    "lora": lambda: graftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "dora": lambda: graftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
    "prompt_tuning": lambda: graftkit.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    "p_tuning": lambda: graftkit.PromptEncoderConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    "prefix_tuning": lambda: graftkit.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    "ia3": lambda: graftkit.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                      feedforward_modules=["down_proj"]),
    "adalora": lambda: graftkit.AdaLoraConfig(init_r=4, target_r=2, total_step=30, lora_alpha=8,
                                              target_modules=["q_proj", "v_proj"]),
    "adaption_prompt": lambda: graftkit.AdaptionPromptConfig(adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM"),
}
MERGEABLE = ["lora", "dora", "ia3", "adalora"]  # methods whose adapters fold into the base weights


def llama():
    return tiny_llama(hidden_size=32, intermediate_size=64, num_attention_heads=4)


def adapted(method: str, seed: int) -> graftkit.PeftModel:
    torch.manual_seed(seed)
    model = graftkit.get_peft_model(llama(), METHODS[method]())
    randomize_adapters(model, seed=seed)  # LoRA B is zero at the start: give every adapter real values
    return model.eval()


def last_logits(model, x) -> torch.Tensor:
    return run(model, x)[:, -1]  # prompt methods add positions in front; the last one is every method's


@pytest.mark.parametrize("method", METHODS)
def test_save_load_disable_switch(tmp_path, method):
    x = token_batch()
    base_out = last_logits(llama(), x)
    model = adapted(method, seed=1)
    out = last_logits(model, x)
    assert (out - base_out).abs().max() > 1e-4, "the adapter must change the output"
    with model.disable_adapter():
        assert torch.equal(last_logits(model, x), base_out)
    model.save_pretrained(tmp_path / "a")
    loaded = graftkit.PeftModel.from_pretrained(llama(), tmp_path / "a").eval()
    torch.testing.assert_close(last_logits(loaded, x), out, rtol=0, atol=1e-6)
    other = adapted(method, seed=2)
    other.save_pretrained(tmp_path / "b")
    loaded.load_adapter(tmp_path / "b", adapter_name="b")
    loaded.set_adapter("b")
    torch.testing.assert_close(last_logits(loaded, x), last_logits(other, x), rtol=0, atol=1e-6)
    loaded.set_adapter("default")
    torch.testing.assert_close(last_logits(loaded, x), out, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_training_lowers_the_loss(method):
    torch.manual_seed(0)
    wide = tiny_llama(hidden_size=64, intermediate_size=128, num_attention_heads=4)  # room for a few virtual tokens
    model = graftkit.get_peft_model(wide, METHODS[method]()).train()
    x = token_batch(batch=4, length=6)
    labels = torch.full_like(x["input_ids"], 5)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(not p.requires_grad for p in model.get_base_model().parameters()
                          if not any(p is q for q in params))
    opt = torch.optim.Adam(params, lr=0.1)
    losses = []
    for _ in range(30):
        loss = model(**x, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("method", MERGEABLE)
def test_merge_unmerge_and_merge_and_unload(method):
    x = token_batch()
    model = adapted(method, seed=3)
    out = last_logits(model, x)
    model.merge_adapter()
    torch.testing.assert_close(last_logits(model, x), out, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(last_logits(model, x), out, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(last_logits(model, x), last_logits(llama(), x), rtol=1e-5, atol=1e-6)
    merged = model.merge_and_unload()
    torch.testing.assert_close(last_logits(merged, x), out, rtol=1e-5, atol=1e-5)


MOVES = {  # name: (how to move the model, the dtype its floating tensors then have, tolerance against float32)
    "to(float64)": (lambda m: m.to(torch.float64), torch.float64, 1e-5),
    "double().float()": (lambda m: m.double().float(), torch.float32, 1e-6),
    "half()": (lambda m: m.half(), torch.float16, 5e-2),
    "to(bfloat16)": (lambda m: m.to(torch.bfloat16), torch.bfloat16, 2e-1),
}
if torch.cuda.is_available():
    MOVES["to(cuda)"] = (lambda m: m.to("cuda"), torch.float32, 1e-4)


@pytest.mark.parametrize("move", MOVES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_moves_between_dtypes_and_devices(tmp_path, method, move):
    """``.to(dtype)``, ``.float()``, ``.half()`` and ``.to(device)`` move base and adapter alike; the moved model
    runs, computes what it did (to the dtype's precision), and saves an adapter that loads onto a moved base."""
    how, dtype, tol = MOVES[move]
    x = token_batch()
    model = adapted(method, seed=1)
    expected = last_logits(model, x)
    moved = how(model)
    assert moved is model
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    assert {t.dtype for t in tensors} == {dtype}, move
    device = torch.device("cuda") if move == "to(cuda)" else x["input_ids"].device
    assert {t.device.type for t in tensors} == {device.type}
    inputs = {k: v.to(device) for k, v in x.items()}
    got = last_logits(model, inputs)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float().cpu(), expected, rtol=0, atol=tol * expected.abs().max().item())
    model.save_pretrained(tmp_path)
    loaded = graftkit.PeftModel.from_pretrained(how(llama()), tmp_path).eval()
    torch.testing.assert_close(last_logits(loaded, inputs).float().cpu(), got.float().cpu(), rtol=0,
                               atol=tol * expected.abs().max().item())
