"""peft's in-memory names: for the same base and config, graftkit's ``named_parameters()`` and ``state_dict()`` keys
are HF peft's, a full state dict moves between the two strictly, and the layer attributes code written for peft
reads (``layer.lora_A["default"]``, ``base_layer``, ``get_base_layer()``, ``active_adapters``, ``merged``) work."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import graftkit
from graftkit.layer import AdaptedLayer
from tests.conftest import DEVICE, run, tiny_bert_cls, tiny_convnet, tiny_gpt2, tiny_llama, token_batch

peft = pytest.importorskip("peft")


class Conv3dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3)
        self.head = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3, 4)))


class GroupedConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, groups=2)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3)))


class AttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        return self.head(self.mha(h, h, h)[0])


class TwoWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Parameter(torch.randn(6, 4))
        self.second = nn.Parameter(torch.randn(4, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.first.T @ self.second.T


class TwoWeightsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = TwoWeights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class NormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lin(x))


def _net(cls):
    def build():
        torch.manual_seed(0)
        return cls().eval().to(DEVICE)
    return build


_G = torch.Generator().manual_seed(7)
IMAGES = torch.randn(2, 3, 6, 6, generator=_G)
VOLUMES = torch.randn(2, 3, 5, 5, 5, generator=_G)
GROUPED = torch.randn(2, 4, 6, 6, generator=_G)
IDS = torch.randint(0, 10, (2, 5), generator=_G)
ROWS = torch.randn(3, 4, generator=_G)

# name: (base builder, config class, config arguments, inputs)
MATRIX = {
    "lora": (tiny_llama, "LoraConfig", dict(r=4, target_modules=["q_proj", "v_proj"]), None),
    "lora-all-linear": (tiny_llama, "LoraConfig", dict(r=2, target_modules="all-linear"), None),
    "dora-bias": (lambda: tiny_llama(attention_bias=True), "LoraConfig",
                  dict(r=4, target_modules=["q_proj", "o_proj"], use_dora=True, bias="lora_only"), None),
    "lora-bias": (tiny_llama, "LoraConfig", dict(r=4, target_modules=["q_proj"], lora_bias=True), None),
    "lora-embeddings": (tiny_llama, "LoraConfig", dict(r=4, target_modules=["embed_tokens", "lm_head"]), None),
    "dora-embedding": (tiny_llama, "LoraConfig", dict(r=4, target_modules=["embed_tokens"], use_dora=True), None),
    "lora-conv1d": (tiny_gpt2, "LoraConfig", dict(r=4, target_modules=["c_attn"], fan_in_fan_out=True), None),
    "lora-conv2d": (tiny_convnet, "LoraConfig", dict(r=2, target_modules=["conv", "conv1x1"]), IMAGES),
    "dora-conv2d": (tiny_convnet, "LoraConfig", dict(r=2, target_modules=["conv"], use_dora=True), IMAGES),
    "dora-grouped-conv2d": (_net(GroupedConvNet), "LoraConfig", dict(r=2, target_modules=["conv"], use_dora=True),
                            GROUPED),
    "modules-to-save": (tiny_llama, "LoraConfig", dict(r=2, target_modules=["k_proj"], modules_to_save=["lm_head"]),
                        None),
    "batchnorm-to-save": (_net(NormNet), "LoraConfig", dict(r=2, target_modules=["lin"], modules_to_save=["bn"]),
                          ROWS),
    "target-parameter": (tiny_llama, "LoraConfig", dict(r=2, target_modules=[], target_parameters=["q_proj.weight"]),
                         None),
    "target-parameters": (tiny_llama, "LoraConfig", dict(r=2, target_modules=[], target_parameters=[
        "self_attn.q_proj.weight", "self_attn.k_proj.weight"]), None),
    "target-parameters-2": (_net(TwoWeightsNet), "LoraConfig", dict(r=2, target_modules=[], target_parameters=[
        "block.first", "block.second"]), ROWS),  # a layer per parameter, nested
    "trainable-tokens": (tiny_llama, "LoraConfig", dict(r=2, target_modules=["q_proj"], trainable_token_indices=[1]),
                         None),  # a Nest: <embedding>.token_adapter.base_layer
    "trainable-tokens-tied": (lambda: tiny_llama(tie_word_embeddings=True), "LoraConfig",
                              dict(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 3]), None),
    "trainable-tokens-method": (tiny_llama, "TrainableTokensConfig", dict(token_indices=[1, 3]), None),
    "trainable-tokens-method-tied": (lambda: tiny_llama(tie_word_embeddings=True), "TrainableTokensConfig",
                                     dict(token_indices=[1, 3]), None),
    "prompt-tuning": (tiny_llama, "PromptTuningConfig", dict(task_type="CAUSAL_LM", num_virtual_tokens=3), None),
    "prefix-tuning": (tiny_llama, "PrefixTuningConfig", dict(task_type="CAUSAL_LM", num_virtual_tokens=3), None),
    "p-tuning": (tiny_llama, "PromptEncoderConfig", dict(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                         encoder_hidden_size=8), None),
    "seq-cls": (tiny_bert_cls, "LoraConfig", dict(r=2, task_type="SEQ_CLS"), None),
    "ia3": (tiny_llama, "IA3Config", dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
            None),
    "ia3-conv3d": (_net(Conv3dNet), "IA3Config", dict(target_modules=["conv"], feedforward_modules=[]), VOLUMES),
    "adalora": (tiny_llama, "AdaLoraConfig", dict(init_r=6, target_r=2, target_modules=["q_proj"], total_step=10),
                None),
    "adalora-conv2d": (tiny_convnet, "AdaLoraConfig", dict(init_r=4, target_r=2, target_modules=["conv"],
                                                           total_step=10), IMAGES),
    "adaption-prompt": (tiny_llama, "AdaptionPromptConfig", dict(task_type="CAUSAL_LM", adapter_len=3,
                                                                 adapter_layers=1), None),
}


def build_both(case: tuple) -> tuple[nn.Module, nn.Module]:
    build, config, kwargs, _ = case
    made = []
    for library in (peft, graftkit):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            made.append(library.get_peft_model(build(), getattr(library, config)(**kwargs)))
    return made[0], made[1]


def _names(model: nn.Module) -> tuple[list[str], list[str]]:
    return [n for n, _ in model.named_parameters()], list(model.state_dict())


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_names_are_peft_names_and_a_full_state_dict_moves_strictly(case):
    theirs, ours = build_both(MATRIX[case])
    assert _names(ours) == _names(theirs)  # the same names, in the same order
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, p in theirs.named_parameters() if p.requires_grad}
    # A full checkpoint of either (what FSDP/DeepSpeed write) loads into the other strictly, and the outputs agree.
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in theirs.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = MATRIX[case][3]
    x = token_batch() if x is None else x.to(DEVICE)
    torch.testing.assert_close(run(ours.eval(), x), run(theirs.eval(), x), atol=1e-5, rtol=0)


def test_multihead_attention_names_and_a_full_state_dict_move_strictly():
    """LoRA on nn.MultiheadAttention: the output projection is an adapted layer inside the base, as in HF peft
    (outputs are compared in test_lora_layers.py: HF peft 0.21.2 adds that projection's update twice)."""
    theirs, ours = build_both((_net(AttentionNet), "LoraConfig", dict(r=2, target_modules=["mha"]), IDS))
    assert [sorted(names) for names in _names(ours)] == [sorted(names) for names in _names(theirs)]
    ours.load_state_dict(theirs.state_dict(), strict=True)
    layer = ours.base_model.model.mha
    assert layer.base_layer.out_proj.lora_A["default"] is layer.base_layer.out_proj.adapters["default"].lora_A


def test_two_adapters_and_a_loaded_one_have_peft_names(tmp_path):
    theirs, ours = build_both(MATRIX["lora"])
    for model, library in ((theirs, peft), (ours, graftkit)):
        model.add_adapter("other", library.LoraConfig(r=2, target_modules=["v_proj", "down_proj"]))
    ours.save_pretrained(tmp_path, selected_adapters=["other"])
    assert sorted(_names(ours)[1]) == sorted(_names(theirs)[1])
    ours.load_adapter(str(tmp_path / "other"), adapter_name="again")
    theirs.load_adapter(str(tmp_path / "other"), adapter_name="again")
    assert sorted(_names(ours)[1]) == sorted(_names(theirs)[1])


def test_adaption_prompts_show_the_active_adapter_under_peft_names():
    """Several adaption-prompt adapters: peft's names hold the active one's tensors (peft keeps the others outside
    the model; here they wait inside it), switching swaps them, and deleting the last puts the attention back."""
    theirs, ours = build_both(MATRIX["adaption-prompt"])
    for model, library in ((theirs, peft), (ours, graftkit)):
        model.add_adapter("b", library.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=5, adapter_layers=1))
    key = "base_model.model.model.layers.1.self_attn.adaption_prompt"
    for active in ("default", "b", "default"):
        for model in (theirs, ours):
            model.set_adapter(active)
        length = 3 if active == "default" else 5
        assert ours.state_dict()[key].shape == theirs.state_dict()[key].shape == (1, length, 16)
    ours.delete_adapter("default")
    assert ours.state_dict()[key].shape == (1, 5, 16)
    ours.delete_adapter("b")
    attention = ours.base_model.model.model.layers[1].self_attn
    assert type(attention).__name__ == "LlamaAttention" and not any("adaption" in n for n in ours.state_dict())


def test_layer_attributes_code_written_for_peft_reads():
    model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("b", graftkit.LoraConfig(r=3, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, nn.Linear) and layer.get_base_layer() is layer.base_layer
    assert sorted(layer.lora_A) == ["b", "default"] and "b" in layer.lora_B
    assert layer.lora_A["b"].weight.shape == (3, 16)
    assert layer.lora_A["default"] is layer.adapters["default"].lora_A  # the module the adapter computes with
    assert layer.active_adapters == ["default"] and model.base_model.active_adapters == ["default"]
    assert model.base_model.peft_config["b"].r == 3
    model.base_model.set_adapter("b")
    assert layer.active_adapters == ["b"] and model.active_adapter == "b"
    x = token_batch()
    before = run(model, x)
    with torch.no_grad():  # writing through peft's path changes what the model computes
        layer.lora_B["b"].weight.fill_(0.5)
    assert not torch.equal(run(model, x), before)
    assert layer.merged is False and layer.merged_adapters == []
    model.merge_adapter()
    assert layer.merged is True and layer.merged_adapters == ["b"]
    model.unmerge_adapter()
    assert layer.merged is False


def test_a_parameter_replaced_on_either_side_is_replaced_on_both():
    model = graftkit.get_peft_model(tiny_llama(), graftkit.IA3Config(target_modules=["k_proj"],
                                                                     feedforward_modules=[]))
    layer = model.base_model.model.model.layers[0].self_attn.k_proj
    adapter = layer.adapters["default"]
    x = token_batch()
    before = run(model, x)
    # What FSDP does: a new parameter object registered on the module that owns it in the tree.
    fresh = nn.Parameter(torch.full_like(layer.ia3_l["default"], 2.0))
    layer.ia3_l.register_parameter("default", fresh)
    assert adapter.ia3_l is fresh
    assert not torch.equal(run(model, x), before)
    # And the adapter's own writes reach the tree (load_state_dict(assign=True) on the whole model too).
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["base_model.model.model.layers.0.self_attn.k_proj.ia3_l.default"].fill_(1.0)
    model.load_state_dict(state, assign=True)
    assert torch.equal(adapter.ia3_l, torch.ones_like(adapter.ia3_l)) and adapter.ia3_l is layer.ia3_l["default"]
    # Moving the model moves the adapter's tensors with it (buffers are new tensors after .to()).
    model.to(torch.float64)
    assert adapter.ia3_l.dtype == torch.float64 and adapter.ia3_l is layer.ia3_l["default"]


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copied_model_is_whole_and_independent(how):
    model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=2, target_modules=["q_proj"],
                                                                      init_lora_weights=False, use_dora=True))
    x = token_batch()
    expected = run(model, x)
    if how == "deepcopy":
        other = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        other = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(run(other, x), expected, atol=0, rtol=0)
    layer = other.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"] is layer.adapters["default"].lora_A
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(2)
    assert not torch.equal(run(other, x), expected)
    assert torch.equal(run(model, x), expected)  # the original is untouched


def test_deleting_an_adapter_removes_its_names_and_keeps_the_adapter_object_whole():
    model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("b", graftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    removed = layer.adapters["b"]
    model.delete_adapter("b")
    assert not any(".b." in n for n in model.state_dict())
    assert "b" not in layer.lora_A and removed.lora_A.weight.shape == (2, 16)
    assert [n for n, _ in removed.named_parameters()] == ["lora_A.weight", "lora_B.weight"]
    model.delete_adapter("default")
    plain = model.get_base_model()
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
