"""LoRA on every layer kind HF peft adapts: nn.Conv1d/2d/3d (grouped and dilated included), DoRA on embeddings and
convolutions, and ``lora_bias``; forward and files equal to HF peft's both ways, merges where defined."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import graftkit
from graftkit.layer import AdaptedLayer
from tests.conftest import DEVICE, check_mixed_rows, run, tiny_bert_cls, token_batch

peft = pytest.importorskip("peft")
warnings.filterwarnings("ignore", message=".*no bias.*")


class Net(nn.Module):
    """Every layer kind in one small network: embedding, Conv1d, grouped and dilated Conv2d, Conv3d, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.c1 = nn.Conv1d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dil = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.c3 = nn.Conv3d(8, 6, (1, 3, 3), padding=(0, 1, 1))
        self.fc = nn.Linear(6, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # (B, T, 8)
        h = self.c1(h.transpose(1, 2))  # (B, 8, T)
        h = h[:, :, :, None].expand(-1, -1, -1, 4).contiguous()  # (B, 8, T, 4)
        h = self.dil(self.c2(h))  # (B, 8, T, 4)
        h = self.c3(h[:, :, None])  # (B, 6, 1, T, 4)
        return self.fc(h.mean(dim=(2, 3, 4)))


def net():
    torch.manual_seed(0)
    return Net().eval().to(DEVICE)


IDS = torch.randint(0, 20, (3, 6), generator=torch.Generator().manual_seed(0)).to(DEVICE)
VARIANTS = {
    "lora": dict(target_modules=["emb", "c1", "c2", "c3", "fc"]),
    "dora": dict(target_modules=["emb", "c1", "c3", "fc"], use_dora=True),
    "dora_grouped": dict(target_modules=["c2"], use_dora=True),  # the grouped Conv2d
    "lora_bias": dict(target_modules=["c1", "c2", "c3", "fc"], lora_bias=True),
}


def peft_adapter(variant, tmp_path):
    torch.manual_seed(1)
    theirs = peft.get_peft_model(net(), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                        **VARIANTS[variant]))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:  # biases and magnitudes away from their starting values too
                param.add_((0.1 * torch.randn(param.shape, generator=g)).to(param.device))
    theirs.eval()
    theirs.save_pretrained(tmp_path / "p")
    return theirs


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_layer_kind_matches_peft_both_ways(tmp_path, variant):
    theirs = peft_adapter(variant, tmp_path)
    expected = run(theirs, IDS)
    ours = graftkit.PeftModel.from_pretrained(net(), tmp_path / "p")
    torch.testing.assert_close(run(ours, IDS), expected, rtol=1e-5, atol=1e-6)
    ours.save_pretrained(tmp_path / "g")
    back = peft.PeftModel.from_pretrained(net(), tmp_path / "g").eval()
    torch.testing.assert_close(run(back, IDS), expected, rtol=1e-5, atol=1e-6)
    assert (expected - run(net(), IDS)).abs().max() > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_and_unmerge_where_defined(tmp_path, variant):
    theirs = peft_adapter(variant, tmp_path)
    ours = graftkit.PeftModel.from_pretrained(net(), tmp_path / "p")
    out = run(ours, IDS)
    if "c2" in VARIANTS[variant]["target_modules"]:  # a grouped convolution has no dense update to merge
        before = {k: v.clone() for k, v in ours.state_dict().items()}
        with pytest.raises(graftkit.UnsupportedError, match="grouped"):
            ours.merge_adapter()
        assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())  # nothing was merged
        return
    ours.merge_adapter()
    torch.testing.assert_close(run(ours, IDS), out, rtol=1e-5, atol=1e-6)
    ours.unmerge_adapter()
    torch.testing.assert_close(run(ours, IDS), out, rtol=1e-5, atol=1e-6)
    merged = ours.merge_and_unload()
    torch.testing.assert_close(run(merged, IDS), out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run(merged, IDS), run(theirs.merge_and_unload(), IDS), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_dilated_convolution_written_out(use_dora):
    """HF peft builds A without the base's dilation (its output then has the wrong size); graftkit's A dilates as the
    base does. Checked against the maths: base + s·B(A(x)), and the merged weight computing the same."""
    model = graftkit.get_peft_model(net(), graftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["dil"],
                                                               init_lora_weights=False, use_dora=use_dora))
    layer = model.get_base_model().dil
    adapter = layer.adapters["default"]
    x = torch.randn(2, 8, 5, 4, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with torch.no_grad():
        got = layer(x)
        if not use_dora:
            expected = layer.base_layer(x) + 2 * adapter.lora_B(adapter.lora_A(x))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    out = run(model, IDS)
    model.merge_adapter()
    torch.testing.assert_close(run(model, IDS), out, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(layer.base_layer(x), got, rtol=1e-5, atol=1e-5)


def test_lora_bias_on_a_transformers_model_merges_into_the_base_bias(tmp_path):
    x = token_batch()
    config = dict(r=4, lora_alpha=8, target_modules=["query", "value"], lora_bias=True, task_type="SEQ_CLS")
    ours = graftkit.get_peft_model(tiny_bert_cls(), graftkit.LoraConfig(**config))
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    out = run(ours, x)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_bert_cls(), tmp_path).eval()
    torch.testing.assert_close(run(theirs, x), out, rtol=1e-5, atol=1e-6)
    layer = ours.get_base_model().bert.encoder.layer[0].attention.self.query
    bias = layer.base_layer.bias.clone()
    ours.merge_adapter()
    torch.testing.assert_close(layer.base_layer.bias, bias + 2 * layer.adapters["default"].lora_B.bias)
    torch.testing.assert_close(run(ours, x), out, rtol=1e-5, atol=1e-6)
    ours.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.bias, bias)


def test_refusals():
    with pytest.raises(graftkit.UnsupportedError, match="lora_bias on nn.Embedding"):
        graftkit.get_peft_model(net(), graftkit.LoraConfig(target_modules=["emb"], lora_bias=True))
    with pytest.raises(graftkit.UnsupportedError, match="divisible by the groups"):
        graftkit.get_peft_model(net(), graftkit.LoraConfig(r=3, target_modules=["c2"]))
    with pytest.raises(graftkit.UnsupportedError, match="lora_bias with use_dora"):
        graftkit.LoraConfig(lora_bias=True, use_dora=True)
    model = graftkit.get_peft_model(nn.Sequential(nn.Linear(4, 4, bias=False)).to(DEVICE),
                                    graftkit.LoraConfig(target_modules=["0"], lora_bias=True, init_lora_weights=False))
    with pytest.raises(graftkit.UnsupportedError, match="without a bias"):
        model.merge_adapter()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_trainable_token_indices_match_peft_both_ways(tmp_path, tied):
    """The rows of a few token ids train in full (new special tokens); a tied output layer uses the same rows."""
    from tests.conftest import tiny_llama
    x = token_batch()
    x["input_ids"][0, :3] = torch.tensor([3, 5, 7])

    def make():
        return tiny_llama(tie_word_embeddings=tied)

    config = dict(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 5, 7], init_lora_weights=False)
    ours = graftkit.get_peft_model(make(), graftkit.LoraConfig(**config))
    trained = [n for n, p in ours.named_parameters() if p.requires_grad and "token" in n]
    assert trained == ["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"]
    with torch.no_grad():
        ours.get_parameter(trained[0]).add_(torch.randn(3, 16, generator=torch.Generator().manual_seed(5)))
    out = run(ours, x)
    ours.save_pretrained(tmp_path / "g")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "g").eval()
    torch.testing.assert_close(run(theirs, x), out, rtol=1e-5, atol=1e-5)
    theirs.save_pretrained(tmp_path / "p")
    back = graftkit.PeftModel.from_pretrained(make(), tmp_path / "p")
    torch.testing.assert_close(run(back, x), out, rtol=1e-5, atol=1e-5)
    # the other rows are the base's: only rows 3, 5, 7 of the embedding differ after a merge
    weight = ours.get_base_model().model.embed_tokens.token_adapter.base_layer.weight
    before = weight.detach().clone()
    ours.merge_adapter()
    torch.testing.assert_close(run(ours, x), out, rtol=1e-5, atol=1e-5)
    changed = (weight.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [3, 5, 7]
    ours.unmerge_adapter()
    assert torch.equal(weight.detach(), before)
    plain = ours.unload()
    assert type(plain.model.embed_tokens) is nn.Embedding and type(plain.lm_head) is nn.Linear  # nothing left behind
    torch.testing.assert_close(run(plain, x), run(make(), x), rtol=1e-5, atol=1e-6)


def test_trainable_token_errors():
    from tests.conftest import tiny_llama
    with pytest.raises(graftkit.ConfigError, match="out of range"):
        graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(target_modules=["q_proj"],
                                                                  trainable_token_indices=[3, 640]))
    with pytest.raises(graftkit.ConfigError, match="distinct"):
        graftkit.LoraConfig(trainable_token_indices=[3, 3])
    with pytest.raises(graftkit.UnsupportedError, match="pick one"):
        graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(target_modules=["embed_tokens"],
                                                                  trainable_token_indices=[3]))


def tiny_moe(kind: str):
    import transformers
    torch.manual_seed(0)
    if kind == "mixtral":
        config = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                            num_experts_per_tok=2)
        return transformers.MixtralForCausalLM(config).eval().to(DEVICE)
    config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         num_experts=4, num_experts_per_tok=2, head_dim=8)
    return transformers.Qwen3MoeForCausalLM(config).eval().to(DEVICE)


MOE_CASES = {
    "mixtral-explicit": ("mixtral", dict(target_modules=["q_proj"], target_parameters=[
        "experts.gate_up_proj", "experts.down_proj", "gate.weight"])),
    "mixtral-all-linear": ("mixtral", dict(target_modules="all-linear")),
    "qwen3_moe-all-linear": ("qwen3_moe", dict(target_modules="all-linear")),
}


@pytest.mark.parametrize("case", MOE_CASES)
def test_fused_experts_match_peft_both_ways(tmp_path, case):
    """Per-expert low-rank updates of the fused 3-D expert parameters (and the router's weight): the same tensors,
    names and outputs as HF peft, for target_parameters and for "all-linear" (which adapts them too, the fused gate/up
    parameter at rank 2r), merges included."""
    from safetensors.torch import load_file
    kind, config = MOE_CASES[case]
    x = token_batch()
    torch.manual_seed(1)
    theirs = peft.get_peft_model(tiny_moe(kind), peft.LoraConfig(r=2, init_lora_weights=False, **config)).eval()
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                param.mul_(0.3)
    expected = run(theirs, x)
    assert (expected - run(tiny_moe(kind), x)).abs().max() > 1e-3
    theirs.save_pretrained(tmp_path / "p")
    ours = graftkit.PeftModel.from_pretrained(tiny_moe(kind), tmp_path / "p")
    torch.testing.assert_close(run(ours, x), expected, rtol=1e-5, atol=1e-6)
    ours.save_pretrained(tmp_path / "g")
    back = peft.PeftModel.from_pretrained(tiny_moe(kind), tmp_path / "g").eval()
    torch.testing.assert_close(run(back, x), expected, rtol=1e-5, atol=1e-6)
    fresh = graftkit.get_peft_model(tiny_moe(kind), graftkit.LoraConfig(r=2, **config))
    fresh.save_pretrained(tmp_path / "f")
    names = {k: v.shape for k, v in load_file(tmp_path / "f" / "adapter_model.safetensors").items()}
    assert names == {k: v.shape for k, v in load_file(tmp_path / "p" / "adapter_model.safetensors").items()}
    ours.merge_adapter()
    torch.testing.assert_close(run(ours, x), expected, rtol=1e-5, atol=1e-5)
    ours.unmerge_adapter()
    torch.testing.assert_close(run(ours, x), expected, rtol=1e-5, atol=1e-6)


def test_fused_expert_updates_train():
    experts = ["experts.gate_up_proj", "experts.down_proj"]
    model = graftkit.get_peft_model(tiny_moe("mixtral"), graftkit.LoraConfig(
        r=2, target_modules=[], target_parameters=experts, init_lora_weights=False))
    model.train()
    x = token_batch()
    model(**x, labels=x["input_ids"]).loss.backward()
    grads = [n for n, p in model.named_parameters() if p.grad is not None]
    assert len(grads) == 8 and all("experts" in n for n in grads)  # A and B of two parameters in two layers
    with pytest.raises(graftkit.UnsupportedError, match="target_parameters does not work"):
        graftkit.LoraConfig(target_parameters=["experts.down_proj"], lora_dropout=0.1)
    with pytest.raises(graftkit.TargetError, match="matched no parameter"):
        graftkit.get_peft_model(tiny_moe("mixtral"), graftkit.LoraConfig(target_modules=[],
                                                                         target_parameters=["experts.nope"]))


def _substitute_experts(monkeypatch):
    """Make fused experts run the dense way (W + s·ΔW substituted), the reference for the routed path."""
    from graftkit.methods import lora
    monkeypatch.setattr(lora.LoraParameters, "routed_forward", staticmethod(lambda *args: None))


def _loss_and_grads(model, x):
    for param in model.parameters():
        param.grad = None
    loss = model(**x, labels=x["input_ids"]).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_routed_experts_equal_the_dense_update(monkeypatch, kind):
    """The experts run on the routed tokens only (x Wₑᵀ + s (x Aₑᵀ) Bₑᵀ per token-expert pair): the same loss and
    gradients as substituting W + s·ΔW for every expert, with the router adapted too."""
    model = graftkit.get_peft_model(tiny_moe(kind), graftkit.LoraConfig(r=2, target_modules="all-linear",
                                                                        init_lora_weights=False)).train()
    x = token_batch(batch=3, length=9)
    calls = []
    from graftkit.methods import lora
    routed = lora.LoraParameters.routed_forward
    monkeypatch.setattr(lora.LoraParameters, "routed_forward",
                        staticmethod(lambda *args: calls.append(routed(*args)) or calls[-1]))
    loss, grads = _loss_and_grads(model, x)
    assert sum(c is not None for c in calls) == 2  # the two experts blocks; the routers substitute their weight
    _substitute_experts(monkeypatch)
    ref_loss, ref_grads = _loss_and_grads(model, x)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and sum("experts" in n for n in grads) == 8
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_routed_experts_never_build_a_tensor_of_the_experts_size(monkeypatch):
    """What the routed path saves: no forward or backward tensor as large as the fused expert parameters (the dense
    substitution builds W + s·ΔW and its gradient for all 16 experts; this checks that it would be caught)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(a, torch.Tensor)}
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:  # not a view
                    self.numel = max(self.numel, t.numel())
            return out

    import transformers
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=16,
                                        num_experts_per_tok=2)
    model = graftkit.get_peft_model(transformers.MixtralForCausalLM(config).to(DEVICE), graftkit.LoraConfig(
        r=2, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"])).train()
    expert_size = 16 * 2 * 64 * 32  # gate_up_proj: (E, 2·ff, d)
    x = token_batch(batch=1, length=4, vocab=32)
    sizes = []
    for _ in range(2):
        mode = Largest()
        with mode:
            model(**x, labels=x["input_ids"]).loss.backward()
        sizes.append(mode.numel)
        _substitute_experts(monkeypatch)
    assert sizes[0] < expert_size // 8 <= expert_size <= sizes[1]


def test_mixed_batch_through_moe_adapters():
    """Each row of a mixed batch gets its own adapter through the router and the experts (or none)."""
    model = graftkit.get_peft_model(tiny_moe("mixtral"), graftkit.LoraConfig(r=2, target_modules="all-linear",
                                                                            init_lora_weights=False))
    model.add_adapter("other", graftkit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    x = token_batch(batch=3, length=6)
    mixed = check_mixed_rows(model, x, ["other", "__base__", "default"])
    assert (mixed[0] - mixed[2]).abs().max() > 1e-3


def test_all_linear_on_unknown_fused_experts_says_what_it_leaves_out():
    model = tiny_moe("mixtral")
    model.config.model_type = "some-new-moe"  # an architecture without the ecosystem's expert mapping
    with pytest.warns(UserWarning, match=r"fused expert parameters of \['model.layers.0.mlp.experts'"):
        graftkit.get_peft_model(model, graftkit.LoraConfig(target_modules="all-linear"))


@pytest.mark.parametrize("targets", [None, "all-linear"], ids=["default", "all-linear"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5", "bert"])
def test_same_config_adapts_the_same_modules_as_peft(tmp_path, arch, targets):
    """The saved tensor names are HF peft's for the same config: defaults per architecture and "all-linear" (which
    leaves out the output layer and a classifier head trained in full)."""
    from safetensors.torch import load_file

    from tests.conftest import tiny_gpt2, tiny_llama, tiny_t5
    make, task = {"llama": (tiny_llama, "CAUSAL_LM"), "gpt2": (tiny_gpt2, "CAUSAL_LM"),
                  "t5": (tiny_t5, "SEQ_2_SEQ_LM"), "bert": (tiny_bert_cls, "SEQ_CLS")}[arch]
    peft.get_peft_model(make(), peft.LoraConfig(r=2, target_modules=targets, task_type=task)).save_pretrained(
        tmp_path / "p")
    graftkit.get_peft_model(make(), graftkit.LoraConfig(r=2, target_modules=targets, task_type=task)).save_pretrained(
        tmp_path / "g")
    assert set(load_file(tmp_path / "g" / "adapter_model.safetensors")) == \
        set(load_file(tmp_path / "p" / "adapter_model.safetensors"))


def test_a_module_is_a_target_or_trained_in_full_not_both():
    with pytest.raises(graftkit.TargetError, match="both adapter targets and modules_to_save"):
        graftkit.get_peft_model(tiny_bert_cls(), graftkit.LoraConfig(target_modules=["query", "classifier"],
                                                                     task_type="SEQ_CLS"))


class AttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.attn(x, x, x)[0])


def attention_net():
    torch.manual_seed(0)
    return AttentionNet().eval().to(DEVICE)


def test_multihead_attention_is_the_maths_and_moves_both_ways(tmp_path):
    """W + s·B A on the packed input projection and on the output projection. HF peft 0.21.2 adds the output
    projection's update twice in its forward and merge (huggingface/peft PR #3774), so it is the reference only with
    that update at zero; against the maths graftkit is checked with both."""
    from safetensors.torch import load_file
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(attention_net(), peft.LoraConfig(r=2, target_modules=["attn"],
                                                                  init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "p")
    ours = graftkit.PeftModel.from_pretrained(attention_net(), tmp_path / "p")
    files = load_file(tmp_path / "p" / "adapter_model.safetensors")
    manual = attention_net()
    with torch.no_grad():
        for key, param in (("", manual.attn.in_proj_weight), ("base_layer.out_proj.", manual.attn.out_proj.weight)):
            a, b = (files[f"base_model.model.attn.{key}lora_{x}.weight"].to(DEVICE) for x in "AB")
            param += 4.0 * b @ a  # s = lora_alpha / r = 8 / 2
    out = run(ours, x)
    torch.testing.assert_close(out, run(manual, x), rtol=1e-5, atol=1e-5)
    ours.save_pretrained(tmp_path / "g")
    assert load_file(tmp_path / "g" / "adapter_model.safetensors").keys() == files.keys()
    with torch.no_grad():  # without the output projection's update HF peft computes the same
        for model in (theirs, ours):  # the same path in both libraries
            model.base_model.model.attn.base_layer.out_proj.lora_B["default"].weight.zero_()
    torch.testing.assert_close(run(ours, x), run(theirs, x), rtol=1e-5, atol=1e-5)
    ours.merge_adapter()
    torch.testing.assert_close(run(ours, x), run(theirs, x), rtol=1e-5, atol=1e-5)
    ours.unmerge_adapter()
    torch.testing.assert_close(ours.get_base_model().attn.base_layer.in_proj_weight,
                               attention_net().attn.in_proj_weight, rtol=1e-5, atol=1e-6)
    # Disabled while merged: the base again, the output projection's merged part taken out too.
    ours.merge_adapter()
    with ours.disable_adapter():
        torch.testing.assert_close(run(ours, x), run(attention_net(), x), rtol=1e-5, atol=1e-5)
    # Two adapters, one deleted, then unloaded: the output projection is a plain layer again.
    ours.add_adapter("other", graftkit.LoraConfig(r=3, target_modules=["attn"]))
    assert sorted(ours.get_base_model().attn.base_layer.out_proj.lora_A) == ["default", "other"]
    ours.delete_adapter("other")
    assert list(ours.get_base_model().attn.base_layer.out_proj.lora_A) == ["default"]
    plain = ours.unload()
    assert type(plain.attn) is nn.MultiheadAttention and type(plain.attn.out_proj) is not AdaptedLayer
    torch.testing.assert_close(run(plain, x), run(attention_net(), x), rtol=1e-5, atol=1e-5)


def test_multihead_attention_trains_and_refuses_what_it_cannot_do():
    model = graftkit.get_peft_model(attention_net(), graftkit.LoraConfig(r=2, target_modules=["attn"]))
    model.train()
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    model(x).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any("out_proj" in n and "lora_B" in n for n in grads) and any(n.endswith("attn.lora_B.default.weight")
                                                              for n in grads)
    with pytest.raises(graftkit.UnsupportedError, match="use_dora"):
        graftkit.get_peft_model(attention_net(), graftkit.LoraConfig(target_modules=["attn"], use_dora=True))
    with pytest.warns(UserWarning, match="no effect on nn.MultiheadAttention"):
        graftkit.get_peft_model(attention_net(), graftkit.LoraConfig(target_modules=["attn"], lora_dropout=0.1))


def test_parameters_only_adapter_round_trips(tmp_path):
    x = token_batch()
    model = graftkit.get_peft_model(tiny_moe("mixtral"), graftkit.LoraConfig(
        r=2, target_modules=[], target_parameters=["experts.down_proj"], init_lora_weights=False))
    out = run(model, x)
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(run(graftkit.PeftModel.from_pretrained(tiny_moe("mixtral"), tmp_path), x), out)
    torch.testing.assert_close(run(peft.PeftModel.from_pretrained(tiny_moe("mixtral"), tmp_path).eval(), x), out,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(graftkit.TargetError, match="selects no module"):
        graftkit.get_peft_model(tiny_moe("mixtral"), graftkit.LoraConfig(target_modules=[]))


def test_nested_parameter_layers_with_two_adapters_mixed_batches_and_both_active(monkeypatch):
    """A layer per adapted parameter, nested: adapter "a" adapts both expert parameters, "b" only gate_up_proj (the
    inner layer). A mixed batch gives each row what its adapter alone gives; both active at once equal the dense
    substitution of both updates; merging both and unloading leave the same outputs in a plain model."""
    experts = ["experts.gate_up_proj", "experts.down_proj"]
    model = graftkit.get_peft_model(tiny_moe("mixtral"), graftkit.LoraConfig(
        r=2, target_modules=[], target_parameters=experts, init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", graftkit.LoraConfig(r=3, target_modules=[], target_parameters=[experts[0]],
                                               init_lora_weights=False))
    block = model.base_model.model.model.layers[0].mlp.experts
    assert sorted(block.adapters) == ["a"] and sorted(block.base_layer.adapters) == ["a", "b"]
    assert block.base_layer.lora_A["b"].weight.shape == (3 * 4, 16)  # r rows per expert
    model.eval()
    x = token_batch(batch=3)
    alone = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        alone[name] = run(model, x)
    with model.disable_adapter():
        alone["__base__"] = run(model, x)
    assert (alone["a"] - alone["b"]).abs().max() > 1e-3 and (alone["b"] - alone["__base__"]).abs().max() > 1e-3
    with torch.no_grad():
        mixed = model(**x, adapter_names=["b", "__base__", "a"]).logits
    for row, name in enumerate(["b", "__base__", "a"]):
        torch.testing.assert_close(mixed[row], alone[name][row], rtol=1e-5, atol=1e-5)
    model.set_adapter(["a", "b"])
    both = run(model, x)
    _substitute_experts(monkeypatch)
    torch.testing.assert_close(run(model, x), both, rtol=1e-5, atol=1e-5)
    assert (both - alone["a"]).abs().max() > 1e-3
    plain = model.merge_and_unload()
    assert not any("lora" in n or "base_layer" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(run(plain, x), both, rtol=1e-4, atol=1e-4)


def test_trainable_tokens_of_two_adapters_share_one_nest_that_goes_with_the_last():
    from tests.conftest import tiny_llama
    model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=2, target_modules=["q_proj"],
                                                                      trainable_token_indices=[3]))
    model.add_adapter("b", graftkit.LoraConfig(r=2, target_modules=["k_proj"], trainable_token_indices=[4, 5]))
    nest = model.base_model.model.model.embed_tokens
    assert sorted(nest.token_adapter.trainable_tokens_delta) == ["b", "default"]
    assert nest.token_adapter.trainable_tokens_delta["b"].shape == (2, 16)
    assert nest.weight is nest.token_adapter.base_layer.weight  # attributes read through
    model.delete_adapter("default")
    assert model.base_model.model.model.embed_tokens is nest and list(nest.token_adapter.adapters) == ["b"]
    model.delete_adapter("b")
    assert type(model.base_model.model.model.embed_tokens) is nn.Embedding
