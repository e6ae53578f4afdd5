"""QLoRA: adapters on bitsandbytes 4-bit / 8-bit bases, against HF peft on the same quantized base."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import graftkit
from tests.conftest import randomize_adapters

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
QUANT = {
    "nf4-double-fp32": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.float32),
    "fp4-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16),
    "int8": dict(load_in_8bit=True),
}
IDS = torch.tensor([[1, 5, 9, 33, 17, 2], [4, 4, 8, 61, 30, 12]])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama64")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
                     ).save_pretrained(path)
    return path


def load(path, quant, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(**QUANT[quant]),
                                                    **kwargs).eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def unpacked_logits(model):
    """Logits with bitsandbytes' plain 4-bit path. On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for
    its bf16 kernel on the first inference forward (eval mode, no input grad); train mode keeps the plain layout,
    which is all HF peft's DoRA can read (its dequantization returns wrong values for a repacked weight). Nothing
    here has dropout, so train mode computes the same function."""
    model.train()
    try:
        return logits(model)
    finally:
        model.eval()


def close(a, b, rel=1e-4):
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("quant", sorted(QUANT))
def test_quantized_adapters_match_peft_both_ways(base_dir, tmp_path, quant, dora):
    kwargs = dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=dora, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(load(base_dir, quant), peft.LoraConfig(**kwargs)).eval()
    randomize_adapters(theirs, std=0.1)
    # DoRA reads the dense weight: compared with peft on bitsandbytes' plain layout (see unpacked_logits); the
    # repacked CPU layout is checked against bitsandbytes' own dequantization in the next test.
    run = unpacked_logits if dora else logits
    expected = run(theirs)
    assert not close(expected, run(load(base_dir, quant)), rel=1e-3), "the adapter must change the output"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "peft")
    ours = graftkit.PeftModel.from_pretrained(load(base_dir, quant), tmp_path / "peft")
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer.base_layer).__name__ in ("Linear4bit", "Linear8bitLt")  # quantized base, no subclass
    got = run(ours)
    assert close(got, expected), (got - expected).abs().max()
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(load(base_dir, quant), tmp_path / "ours").eval()
    assert close(run(back), expected)


@pytest.mark.parametrize("quant", ["nf4-double-fp32", "fp4-bf16"])
def test_dora_reads_4bit_weights_as_bitsandbytes_dequantizes_them(base_dir, quant):
    """The referee is bitsandbytes' dequantize_4bit of the layer before any forward. After an inference forward,
    bitsandbytes may have repacked the weight for its CPU kernel (absmax rounded to bf16); graftkit must still read
    the same weight (to bf16 absmax rounding), and DoRA's output must follow from it."""
    model = graftkit.get_peft_model(load(base_dir, quant), graftkit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True))
    randomize_adapters(model, std=0.1)
    inner = model.base_model.model.model
    layers = [inner.layers[1].mlp.down_proj, inner.layers[0].self_attn.q_proj]
    referee = [bnb.functional.dequantize_4bit(m.base_layer.weight.data, m.base_layer.weight.quant_state).float()
               for m in layers]
    logits(model)  # an inference forward: repacks the weights where the CPU has AVX512-BF16
    g = torch.Generator().manual_seed(11)
    for layer, w_ref in zip(layers, referee):
        w = graftkit.weights.get_weight(layer.base_layer).float()
        assert (w - w_ref).abs().max() <= 2 ** -8 * w_ref.abs().max()
        adapter = layer.adapters["default"]
        x = torch.randn(3, w_ref.shape[1], generator=g)
        with torch.no_grad():
            got = layer(x)
            a, b, s = adapter.lora_A.weight, adapter.lora_B.weight, adapter.scaling
            scale = adapter.lora_magnitude_vector.weight / torch.linalg.vector_norm(w_ref + s * b @ a, dim=1)
            want = scale * (layer.base_layer(x) + s * (x @ a.T) @ b.T)
        assert (got - want).abs().max() <= 5e-3 * want.abs().max(), (got - want).abs().max()


@pytest.mark.parametrize("quant", sorted(QUANT))
def test_trainable_parameter_counts_match_peft(base_dir, quant):
    kwargs = dict(r=8, target_modules="all-linear")
    ours = graftkit.get_peft_model(load(base_dir, quant), graftkit.LoraConfig(**kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(load(base_dir, quant), peft.LoraConfig(**kwargs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    total = ours.get_nb_trainable_parameters()[1]
    dense = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(base_dir).parameters())
    assert total == dense + ours.get_nb_trainable_parameters()[0]  # 4-bit weights counted at their full size


@pytest.mark.parametrize("quant", sorted(QUANT))
def test_merge_into_quantized_and_dequantized_merge(base_dir, tmp_path, quant):
    model = graftkit.get_peft_model(load(base_dir, quant), graftkit.LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model, std=0.1)
    expected = logits(model)
    # Re-quantized merge: still quantized layers, the update rounded onto the quantization grid.
    rounded = graftkit.PeftModel.from_pretrained(load(base_dir, quant), _save(model, tmp_path / "a"))
    with pytest.warns(UserWarning, match="re-quantizes"):
        merged_q = rounded.merge_and_unload()
    assert type(merged_q.model.layers[0].self_attn.q_proj).__name__ in ("Linear4bit", "Linear8bitLt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_merged = peft.PeftModel.from_pretrained(load(base_dir, quant), tmp_path / "a").merge_and_unload()
    reference = logits(peft_merged)  # peft's dequantize-add-requantize on the same base and adapter
    assert close(logits(merged_q), reference, rel=1e-3)
    # Full-precision merge: plain nn.Linear layers, no quantization left, saved and reloaded as a normal model.
    full = graftkit.PeftModel.from_pretrained(load(base_dir, quant), tmp_path / "a").merge_and_unload(dequantize=True)
    assert not any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in full.modules())
    assert type(full.model.layers[0].self_attn.q_proj) is nn.Linear
    # Against the same adapter on the dequantized (not merged) base, the merge is exact fp32 maths ...
    dense_unmerged = graftkit.PeftModel.from_pretrained(load(base_dir, quant), tmp_path / "a")
    dense_unmerged._dequantize_base()
    assert close(logits(full), logits(dense_unmerged), rel=1e-5)
    # ... and within bitsandbytes' own CPU matmul rounding (bf16 dequant, fp16 int8 activations) of the quantized model.
    assert close(logits(full), expected, rel=2e-2)
    full.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert close(logits(reloaded), logits(full), rel=1e-5)


def _save(model, path):
    model.save_pretrained(path)
    return path


def test_prepare_model_for_kbit_training_and_checkpointed_training(base_dir):
    base = load(base_dir, "nf4-double-fp32", dtype=torch.bfloat16)
    assert any(p.dtype == torch.bfloat16 for p in base.parameters())
    base = graftkit.prepare_model_for_kbit_training(base, gradient_checkpointing_kwargs={"use_reentrant": True})
    assert not any(p.requires_grad for p in base.parameters())
    assert {p.dtype for p in base.parameters() if type(p).__name__ != "Params4bit"} == {torch.float32}
    assert base.is_gradient_checkpointing
    model = graftkit.get_peft_model(base, graftkit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    _train_and_check(model)


def test_gradient_checkpointing_on_full_precision_base(base_dir):
    model = graftkit.get_peft_model(LlamaForCausalLM.from_pretrained(base_dir),
                                    graftkit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert model.base_model.model.is_gradient_checkpointing
    assert model.get_input_embeddings()(IDS).requires_grad  # input gradients enabled for the frozen base
    _train_and_check(model)


def _train_and_check(model):
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for _, p in named], lr=2e-2)
    losses = []
    for step in range(12):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        if step == 0:  # B starts at zero, so A's first gradient is zero; every B must get one through checkpointing
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in named if "lora_B" in n)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


QUANTIZED_METHODS = {
    "ia3": lambda lib: lib.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                     feedforward_modules=["down_proj"]),
    "adalora": lambda lib: lib.AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=8,
                                             target_modules=["q_proj", "v_proj", "down_proj"]),
}


@pytest.mark.parametrize("method", sorted(QUANTIZED_METHODS))
@pytest.mark.parametrize("quant", ["nf4-double-fp32", "int8"])
def test_ia3_and_adalora_on_quantized_bases(base_dir, tmp_path, quant, method):
    """HF peft's adapter on the same quantized base gives the same outputs in graftkit; merging goes through the same
    weight access as LoRA: exact against the dequantized base, re-quantized within the grid's rounding."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(load(base_dir, quant), QUANTIZED_METHODS[method](peft)).eval()
        randomize_adapters(theirs, std=0.3)
        expected = logits(theirs)
        theirs.save_pretrained(tmp_path / "peft")
    assert not close(expected, logits(load(base_dir, quant)), rel=1e-3), "the adapter must change the output"
    ours = graftkit.PeftModel.from_pretrained(load(base_dir, quant), tmp_path / "peft")
    assert close(logits(ours), expected)
    full = graftkit.PeftModel.from_pretrained(load(base_dir, quant), tmp_path / "peft").merge_and_unload(
        dequantize=True)
    dense = graftkit.PeftModel.from_pretrained(load(base_dir, quant), tmp_path / "peft")
    dense._dequantize_base()
    assert close(logits(full), logits(dense), rel=1e-5)
    with pytest.warns(UserWarning, match="re-quantizes"):
        merged = ours.merge_and_unload()
    assert type(merged.model.layers[0].self_attn.v_proj).__name__ in ("Linear4bit", "Linear8bitLt")
    # HF peft has no merge for these on quantized layers: the re-quantized merge must land near the adapter's output,
    # far nearer than the base model is (the grid's rounding is what remains).
    miss = (logits(merged) - expected).abs().max()
    assert miss < 0.25 * (logits(load(base_dir, quant)) - expected).abs().max(), miss


def test_replace_lora_weights_loftq_on_a_4bit_base(base_dir):
    """LoftQ for a model already loaded in 4-bit: each layer's s·B A becomes the rank-r SVD of W - Q (W read from
    the original safetensors, lora_alpha != r), which brings the logits closer to the full-precision model's; a
    callback that says no puts that layer's A, B back."""
    from graftkit.weights import get_weight
    full = logits(AutoModelForCausalLM.from_pretrained(base_dir).eval())
    model = graftkit.get_peft_model(load(base_dir, "nf4-double-fp32"), graftkit.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    before = logits(model)
    untouched = "model.layers.0.self_attn.q_proj"
    layer = model.get_base_model().get_submodule(untouched)
    kept = layer.adapters["default"].lora_A.weight.detach().clone()
    graftkit.replace_lora_weights_loftq(model, callback=lambda _model, name: name != untouched)
    assert torch.equal(layer.adapters["default"].lora_A.weight, kept)
    after = logits(model)
    assert (after - full).abs().mean() < (before - full).abs().mean()  # random weights: a rank-4 share of the error
    original = AutoModelForCausalLM.from_pretrained(base_dir).model.layers[1].mlp.down_proj.weight.detach()
    down = model.get_base_model().model.layers[1].mlp.down_proj
    u, sv, vh = torch.linalg.svd(original - get_weight(down.base_layer).float(), full_matrices=False)
    torch.testing.assert_close(down.adapters["default"].delta_weight(), (u[:, :4] * sv[:4]) @ vh[:4],
                               rtol=1e-4, atol=1e-6)
    with pytest.raises(graftkit.CheckpointError, match="no model.safetensors"):
        graftkit.replace_lora_weights_loftq(model, model_path=base_dir / "nowhere")
    with pytest.raises(graftkit.TargetError, match="no 4-bit layer"):
        graftkit.replace_lora_weights_loftq(graftkit.get_peft_model(
            AutoModelForCausalLM.from_pretrained(base_dir), graftkit.LoraConfig(r=4)), model_path=base_dir)
