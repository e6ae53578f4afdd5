"""LoRA adapters saved on transformers 4's per-expert MoE layers (``block_sparse_moe.experts.3.w1``) load onto
transformers 5's fused experts: checked against the update written out on the fused weights and against HF peft."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import graftkit
from tests.conftest import run, token_batch
from tests.test_lora_layers import tiny_moe

peft = pytest.importorskip("peft")

# (layer block, gate/up/down names, router name) in transformers 4's files
QWEN = ("mlp", ("gate_proj", "up_proj", "down_proj"))
LAYOUT = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2")), "qwen3_moe": QWEN, "qwen2_moe": QWEN}


def base_model(kind):
    """The tiny MoE models of test_lora_layers, and Qwen2-MoE, whose shared expert keeps linear gate/up/down_proj
    layers of the same names as the experts' old ones."""
    if kind != "qwen2_moe":
        return tiny_moe(kind)
    import transformers
    torch.manual_seed(0)
    config = transformers.Qwen2MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                                         shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1, num_experts=4, num_experts_per_tok=2)
    return transformers.Qwen2MoeForCausalLM(config).eval()


def legacy_adapter(folder, kind, seed, r=2, alpha=4, attention=("q_proj",), **config):
    """A transformers-4-era adapter folder (attention projections, every expert's three layers, the router) with
    non-zero A and B; returns its tensors as {(layer, what, expert or None): (A, B)}."""
    gen = torch.Generator().manual_seed(seed)
    model = base_model(kind)
    block, (gate, up, down) = LAYOUT[kind]
    hidden, experts = model.config.hidden_size, 4
    inter = model.model.layers[0].mlp.experts.down_proj.shape[2]
    pairs, tensors = {}, {}

    def pair(key, rank, inp, out):
        a = torch.randn(rank, inp, generator=gen) * 0.3
        b = torch.randn(out, rank, generator=gen) * 0.3
        tensors[f"base_model.model.{key}.lora_A.weight"], tensors[f"base_model.model.{key}.lora_B.weight"] = a, b
        return a, b

    ranks = {gate: r, up: r, down: r, **config.pop("branch_ranks", {})}
    for layer in range(2):
        prefix = f"model.layers.{layer}"
        for name in attention:
            out, inp = getattr(model.model.layers[layer].self_attn, name).weight.shape
            pairs[(layer, name, None)] = pair(f"{prefix}.self_attn.{name}", r, inp, out)
        pairs[(layer, "router", None)] = pair(f"{prefix}.{block}.gate", r, hidden, experts)
        if kind == "qwen2_moe":  # the shared expert: linear layers before and after
            for name in (gate, up, down):
                out, inp = getattr(model.model.layers[layer].mlp.shared_expert, name).weight.shape
                pairs[(layer, f"shared.{name}", None)] = pair(f"{prefix}.mlp.shared_expert.{name}", r, inp, out)
        for e in range(experts):
            pairs[(layer, gate, e)] = pair(f"{prefix}.{block}.experts.{e}.{gate}", ranks[gate], hidden, inter)
            pairs[(layer, up, e)] = pair(f"{prefix}.{block}.experts.{e}.{up}", ranks[up], hidden, inter)
            pairs[(layer, down, e)] = pair(f"{prefix}.{block}.experts.{e}.{down}", ranks[down], inter, hidden)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "target_modules": [*attention, gate, up, down, "gate"], "lora_dropout": 0.0, "bias": "none", **config}))
    return pairs


def written_out(kind, pairs, scale):
    """The base model with every update added to the weights it changes, by hand: w1/w3 as the two halves of
    gate_up_proj[e], w2 as down_proj[e], the router's linear update on its weight."""
    model = base_model(kind)
    _, (gate, up, down) = LAYOUT[kind]
    with torch.no_grad():
        for (layer, what, e), (a, b) in pairs.items():
            mlp = model.model.layers[layer].mlp
            s = scale(what)
            if what.startswith("shared."):
                getattr(mlp.shared_expert, what[7:]).weight += s * b @ a
            elif what.endswith("_proj") and what not in (gate, up, down):
                getattr(model.model.layers[layer].self_attn, what).weight += s * b @ a
            elif what == "router":
                mlp.gate.weight += s * b @ a
            elif what == down:
                mlp.experts.down_proj[e] += s * b @ a
            else:
                half = mlp.experts.gate_up_proj.shape[1] // 2
                rows = slice(0, half) if what == gate else slice(half, 2 * half)
                mlp.experts.gate_up_proj[e, rows] += s * b @ a
    return model


@pytest.mark.parametrize("kind, targets", [("mixtral", "list"), ("qwen3_moe", "list"), ("mixtral", "all-linear"),
                                           ("qwen2_moe", "list")])
def test_a_transformers_4_adapter_loads_as_the_maths_and_as_hf_peft_reads_it(tmp_path, kind, targets):
    attention = ("q_proj",) if targets == "list" else ("q_proj", "k_proj", "v_proj", "o_proj")
    pairs = legacy_adapter(tmp_path / "v4", kind, seed=11, attention=attention,
                           **({} if targets == "list" else {"target_modules": "all-linear"}))
    x = token_batch()
    expected = run(written_out(kind, pairs, lambda what: 2.0), x)
    assert (expected - run(base_model(kind), x)).abs().max() > 1e-2  # the adapter changes the outputs
    ours = graftkit.PeftModel.from_pretrained(base_model(kind), tmp_path / "v4")
    torch.testing.assert_close(run(ours, x), expected, rtol=1e-5, atol=1e-5)
    if kind != "qwen2_moe":  # HF peft 0.21 fails on this one ("Target module Qwen2MoeTopKRouter() is not supported")
        theirs = peft.PeftModel.from_pretrained(base_model(kind), tmp_path / "v4").eval()
        torch.testing.assert_close(run(theirs, x), expected, rtol=1e-5, atol=1e-5)
    # saved again, it is an adapter of the fused layout: HF peft's names and tensors, read back both ways
    ours.save_pretrained(tmp_path / "v5")
    config = json.loads((tmp_path / "v5" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["down_proj", "gate.weight", "gate_up_proj"]
    kept = ["q_proj", "gate_proj", "up_proj", "down_proj"] if kind == "qwen2_moe" else ["q_proj"]
    assert config["target_modules"] == ("all-linear" if targets == "all-linear" else kept)
    assert config["rank_pattern"] == {r".*\.gate_up_proj": 4} and config["alpha_pattern"] == {r".*\.gate_up_proj": 8}
    back = peft.PeftModel.from_pretrained(base_model(kind), tmp_path / "v5").eval()
    torch.testing.assert_close(run(back, x), expected, rtol=1e-5, atol=1e-5)
    again = graftkit.PeftModel.from_pretrained(base_model(kind), tmp_path / "v5")
    torch.testing.assert_close(run(again, x), expected, rtol=1e-5, atol=1e-5)
    ours.merge_adapter()
    torch.testing.assert_close(run(ours, x), expected, rtol=1e-5, atol=1e-5)


def test_load_adapter_converts_too_and_rslora_branches_keep_their_scales(tmp_path):
    """Branches of one fused parameter with other ranks and alphas under rsLoRA: each keeps its scale
    alpha/sqrt(r) (HF peft doubles r and alpha, which changes an rsLoRA scale; graftkit is checked on the maths)."""
    pairs = legacy_adapter(tmp_path / "v4", "mixtral", seed=12, r=2, alpha=4, use_rslora=True,
                           branch_ranks={"w3": 3}, rank_pattern={"w3": 3}, alpha_pattern={"w3": 6})
    x = token_batch()
    scale = {"w3": 6 / 3 ** 0.5}
    expected = run(written_out("mixtral", pairs, lambda what: scale.get(what, 4 / 2 ** 0.5)), x)
    model = graftkit.get_peft_model(tiny_moe("mixtral"), graftkit.LoraConfig(r=2, target_modules=["k_proj"]))
    model.load_adapter(tmp_path / "v4", adapter_name="old")
    model.set_adapter("old")
    torch.testing.assert_close(run(model, x), expected, rtol=1e-5, atol=1e-5)
    assert model.peft_config["old"].rank_pattern[r".*\.gate_up_proj"] == 5


def test_what_cannot_be_converted_is_refused_and_the_model_stays(tmp_path):
    legacy_adapter(tmp_path / "v4", "mixtral", seed=13)
    from safetensors.torch import load_file
    tensors = load_file(tmp_path / "v4" / "adapter_model.safetensors")
    partial = {k: v for k, v in tensors.items() if ".experts.3.w3." not in k or "layers.1" not in k}
    (tmp_path / "partial").mkdir()
    save_file(partial, tmp_path / "partial" / "adapter_model.safetensors")
    (tmp_path / "partial" / "adapter_config.json").write_text((tmp_path / "v4" / "adapter_config.json").read_text())
    base = tiny_moe("mixtral")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    missing = r"no LoRA pair for .*layers\.1\.block_sparse_moe\.experts\.3\.w3,"
    with pytest.raises(graftkit.CheckpointError, match=missing):
        graftkit.PeftModel.from_pretrained(base, tmp_path / "partial")
    dora = dict(tensors)
    dora["base_model.model.model.layers.0.block_sparse_moe.experts.0.w1.lora_magnitude_vector"] = torch.ones(32)
    (tmp_path / "dora").mkdir()
    save_file(dora, tmp_path / "dora" / "adapter_model.safetensors")
    (tmp_path / "dora" / "adapter_config.json").write_text((tmp_path / "v4" / "adapter_config.json").read_text())
    with pytest.raises(graftkit.UnsupportedError, match="experts.0.w1.lora_magnitude_vector"):
        graftkit.PeftModel.from_pretrained(base, tmp_path / "dora")
    assert type(base.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
