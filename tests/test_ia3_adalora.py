"""IA3 and AdaLoRA: forward, files, merges, mixed batches and AdaLoRA's rank allocation against HF peft on the same
weights, and the maths written out where HF peft has no counterpart."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import graftkit
from tests.conftest import DEVICE, check_mixed_rows, run, tiny_bert_cls, tiny_gpt2, tiny_llama, token_batch

peft = pytest.importorskip("peft")
warnings.filterwarnings("ignore", message=".*Unexpected keyword arguments.*")

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert_cls}
IA3_TARGETS = {  # (targets, feed-forward modules): output scaling with and without bias, input scaling, Conv1D
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (["query", "value", "output.dense"], ["output.dense"]),
}


def ia3(library, model: str, **kwargs):
    targets, feedforward = IA3_TARGETS[model]
    task = {"bert": "SEQ_CLS"}.get(model)
    return library.IA3Config(target_modules=targets, feedforward_modules=feedforward, init_ia3_weights=False,
                             task_type=task, **kwargs)


def set_seeded(model, seed: int, pattern: str = "ia3_l") -> None:
    """Give every adapter tensor named ``pattern`` seeded non-trivial values (around 1 for IA3 scales)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if pattern in name:
                param.copy_((1 + 0.3 * torch.randn(param.shape, generator=g)).to(param.device, param.dtype))


# ---------------------------------------------------------------------------------------------- IA3
@pytest.mark.parametrize("model", sorted(MODELS))
def test_ia3_matches_peft_both_ways(tmp_path, model):
    x = token_batch()
    ours = graftkit.get_peft_model(MODELS[model](), ia3(graftkit, model))
    set_seeded(ours, seed=1)
    out = run(ours, x)
    changed = lambda a, b: (a - b).abs().max() > 1e-3 * b.abs().max()  # noqa: E731 (BERT's tiny logits: relative)
    assert changed(out, run(MODELS[model](), x))
    ours.save_pretrained(tmp_path / "g")
    saved = json.loads((tmp_path / "g" / "adapter_config.json").read_text())
    assert saved["feedforward_modules"] == IA3_TARGETS[model][1] and "layers_to_transform" not in saved
    theirs = peft.PeftModel.from_pretrained(MODELS[model](), tmp_path / "g").eval()
    torch.testing.assert_close(run(theirs, x), out, rtol=0, atol=1e-6)
    # ... and an adapter HF peft trained (other values) loads into graftkit with equal outputs
    set_seeded(theirs, seed=2)
    theirs.save_pretrained(tmp_path / "p")
    back = graftkit.PeftModel.from_pretrained(MODELS[model](), tmp_path / "p")
    torch.testing.assert_close(run(back, x), run(theirs, x), rtol=0, atol=1e-6)
    assert changed(run(back, x), out)


def test_ia3_is_the_scaling_written_out():
    """Output scaling multiplies a layer's output by l; input scaling multiplies its input by l."""
    model = graftkit.get_peft_model(tiny_llama(), ia3(graftkit, "llama"))
    set_seeded(model, seed=3)
    layer = model.model.model.layers[0]
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    k, down = layer.self_attn.k_proj, layer.mlp.down_proj
    h = torch.randn(3, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        l_k = k.adapters["default"].ia3_l.view(-1)
        l_down = down.adapters["default"].ia3_l.view(-1)
        torch.testing.assert_close(k(x), k.base_layer(x) * l_k)
        torch.testing.assert_close(down(h), down.base_layer(h * l_down))
    assert tuple(k.adapters["default"].ia3_l.shape) == (8, 1)  # (out, 1): one KV head of 8
    assert tuple(down.adapters["default"].ia3_l.shape) == (1, 32)  # (1, in)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_ia3_merge_unmerge_and_zero_scales(model):
    x = token_batch()
    ours = graftkit.get_peft_model(MODELS[model](), ia3(graftkit, model))
    set_seeded(ours, seed=4)
    with torch.no_grad():  # a scale of exactly 0 cannot be divided back out: unmerge must still restore the weight
        for name, param in ours.named_parameters():
            if "ia3_l" in name:
                param.view(-1)[0] = 0.0
    base = {k: v.clone() for k, v in ours.get_base_model().state_dict().items() if "ia3_l" not in k}
    out = run(ours, x)
    ours.merge_adapter()
    torch.testing.assert_close(run(ours, x), out, rtol=1e-5, atol=1e-5)
    ours.unmerge_adapter()
    after = {k: v for k, v in ours.get_base_model().state_dict().items() if "ia3_l" not in k}
    for key, value in base.items():
        torch.testing.assert_close(after[key], value, rtol=1e-6, atol=1e-7, msg=key)
    merged = ours.merge_and_unload()
    torch.testing.assert_close(run(merged, x), out, rtol=1e-5, atol=1e-5)


def test_ia3_mixed_batch_rows_equal_single_adapter_runs():
    x = token_batch(batch=3)
    model = graftkit.get_peft_model(tiny_llama(), ia3(graftkit, "llama"))
    model.add_adapter("other", ia3(graftkit, "llama"))
    set_seeded(model, seed=5)
    check_mixed_rows(model, x, ["other", "__base__", "default"])


def test_ia3_add_weighted_adapter_matches_peft(tmp_path):
    x = token_batch()
    ours = graftkit.get_peft_model(tiny_llama(), ia3(graftkit, "llama"))
    ours.add_adapter("b", ia3(graftkit, "llama"))
    set_seeded(ours, seed=6)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    ours.add_weighted_adapter(["default", "b"], [0.7, 0.4], "mix")
    theirs.add_weighted_adapter(["default", "b"], [0.7, 0.4], "mix")
    ours.set_adapter("mix")
    theirs.set_adapter("mix")
    torch.testing.assert_close(run(ours, x), run(theirs.eval(), x), rtol=0, atol=1e-6)
    layer = ours.model.model.layers[1].self_attn.v_proj.adapters
    torch.testing.assert_close(layer["mix"].ia3_l, 0.7 * layer["default"].ia3_l + 0.4 * layer["b"].ia3_l)
    with pytest.raises(graftkit.ConfigError, match="weighted sum"):
        ours.add_weighted_adapter(["default", "b"], [0.5, 0.5], "bad", combination_type="ties")


def test_ia3_config_errors():
    with pytest.raises(graftkit.ConfigError, match="not in target_modules"):
        graftkit.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(0)
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=32))
    neox.config.model_type = "unknown-arch"
    with pytest.raises(graftkit.ConfigError, match="feedforward_modules"):
        graftkit.get_peft_model(neox, graftkit.IA3Config(target_modules=["dense_4h_to_h"]))
    with pytest.raises(graftkit.TargetError, match="cannot adapt"):
        graftkit.get_peft_model(tiny_llama(), graftkit.IA3Config(target_modules=["embed_tokens"],
                                                                 feedforward_modules=[]))


# ---------------------------------------------------------------------------------------------- AdaLoRA
ADALORA = dict(init_r=6, target_r=3, tinit=2, tfinal=3, deltaT=2, total_step=14, lora_alpha=16,
               target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")


def _train(model, steps: int, allocate) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(steps):
        batch = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(step)).to(DEVICE)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        allocate(step)
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_adalora_training_matches_peft_rank_pattern_and_files(tmp_path):
    """The same start (HF peft's initial adapter, random everywhere), data and schedule: equal losses at every step
    (the orthogonality penalty included), the same rank pattern, and trained-and-pruned files that load both ways."""
    theirs = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(init_lora_weights=False, **ADALORA))
    theirs.save_pretrained(tmp_path / "start")
    ours = graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "start", is_trainable=True)
    theirs.train()
    ours.train()
    losses_theirs = _train(theirs, 14, theirs.base_model.update_and_allocate)
    losses_ours = _train(ours, 14, ours.base_model.update_and_allocate)
    torch.testing.assert_close(torch.tensor(losses_ours), torch.tensor(losses_theirs), rtol=1e-5, atol=0)
    pattern = ours.peft_config["default"].rank_pattern
    assert pattern == {k.replace(".default", ""): v for k, v in theirs.peft_config["default"].rank_pattern.items()}
    assert sum(map(sum, pattern.values())) == 3 * 6  # target_r x adapted layers
    assert len(set(map(sum, pattern.values()))) > 1  # the budget went where the importance was, not evenly
    ours.eval()
    theirs.eval()
    x = token_batch()
    out = run(ours, x)
    torch.testing.assert_close(out, run(theirs, x), rtol=1e-4, atol=1e-5)
    ours.save_pretrained(tmp_path / "g")
    theirs.save_pretrained(tmp_path / "p")
    config = json.loads((tmp_path / "g" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == json.loads((tmp_path / "p" / "adapter_config.json").read_text())["rank_pattern"]
    from safetensors.torch import load_file
    ours_files, theirs_files = load_file(tmp_path / "g" / "adapter_model.safetensors"), \
        load_file(tmp_path / "p" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours_files.items()} == {k: v.shape for k, v in theirs_files.items()}
    for path, kept in pattern.items():  # only the kept ranks are written
        assert ours_files[f"base_model.model.{path}"].shape == (sum(kept), 1)
    from_theirs = graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "p")
    torch.testing.assert_close(run(from_theirs, x), out, rtol=1e-4, atol=1e-5)
    into_theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "g").eval()
    torch.testing.assert_close(run(into_theirs, x), out, rtol=1e-4, atol=1e-5)
    from_ours = graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "g")
    torch.testing.assert_close(run(from_ours, x), out, rtol=0, atol=1e-6)
    from_ours.merge_adapter()
    torch.testing.assert_close(run(from_ours, x), out, rtol=1e-5, atol=1e-5)


def test_adalora_untrained_adapter_round_trips_with_peft(tmp_path):
    x = token_batch()
    ours = graftkit.get_peft_model(tiny_llama(), graftkit.AdaLoraConfig(init_lora_weights=False, **ADALORA))
    out = run(ours, x)
    assert (out - run(tiny_llama(), x)).abs().max() > 1e-3
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"] is None
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(run(theirs, x), out, rtol=0, atol=1e-6)


def test_adalora_orthogonality_penalty_written_out():
    model = graftkit.get_peft_model(tiny_llama(), graftkit.AdaLoraConfig(init_lora_weights=False, **ADALORA))
    x = token_batch()
    model.train()
    loss = model(**x, labels=x["input_ids"]).loss
    plain = model.get_base_model()(**x, labels=x["input_ids"]).loss  # the same adapters, no penalty
    norms = []
    for name, param in model.named_parameters():
        if name.endswith("lora_A.default"):
            norms.append(torch.linalg.matrix_norm(param @ param.T - torch.eye(param.shape[0], device=param.device)))
        elif name.endswith("lora_B.default"):
            norms.append(torch.linalg.matrix_norm(param.T @ param - torch.eye(param.shape[1], device=param.device)))
    assert len(norms) == 12
    torch.testing.assert_close(loss, plain + 0.5 * torch.stack(norms).mean())
    model.eval()
    torch.testing.assert_close(model(**x, labels=x["input_ids"]).loss, plain)  # evaluation loss: no penalty


def test_adalora_allocation_needs_gradients_and_trainer_calls_it(tmp_path):
    model = graftkit.get_peft_model(tiny_llama(), graftkit.AdaLoraConfig(**ADALORA))
    with pytest.raises(graftkit.UsageError, match="zero_grad"):
        model.update_and_allocate(0)
    from datasets import Dataset
    from transformers import TrainingArguments
    rows = torch.randint(0, 64, (8, 9), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": rows.tolist(), "labels": rows.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=14, per_device_train_batch_size=4, learning_rate=1e-2,
                             save_strategy="no", report_to=[], use_cpu=DEVICE.type == "cpu", logging_steps=100)
    graftkit.Trainer(model=model, args=args, train_dataset=data).train()
    pattern = model.peft_config["default"].rank_pattern
    assert pattern is not None and sum(map(sum, pattern.values())) == 3 * 6
    for path, kept in pattern.items():  # pruned ranks hold Λ = 0 after the last step
        module = model.get_base_model().get_submodule(path.rsplit(".", 1)[0])
        lora_e = module.adapters["default"].lora_E.view(-1)
        assert bool((lora_e[~torch.tensor(kept, device=lora_e.device)] == 0).all())


def test_adalora_config_errors():
    with pytest.raises(graftkit.ConfigError, match="total_step is required"):
        graftkit.AdaLoraConfig(target_modules=["q_proj"])
    with pytest.raises(graftkit.ConfigError, match="no pruning phase"):
        graftkit.AdaLoraConfig(target_modules=["q_proj"], total_step=10, tinit=8, tfinal=2)
    with pytest.raises(graftkit.UnsupportedError, match="DoRA"):
        graftkit.AdaLoraConfig(target_modules=["q_proj"], total_step=10, use_dora=True)
    with pytest.raises(graftkit.UnsupportedError, match="alpha_pattern"):
        graftkit.AdaLoraConfig(target_modules=["q_proj"], total_step=10, alpha_pattern={"q_proj": 4})
    with pytest.warns(UserWarning, match="init_r"):
        graftkit.AdaLoraConfig(target_modules=["q_proj"], total_step=10, r=16)
    with pytest.raises(graftkit.TargetError, match="cannot adapt"):
        graftkit.get_peft_model(tiny_llama(), graftkit.AdaLoraConfig(target_modules=["embed_tokens"], total_step=10))


def test_adalora_trainer_resumes_mid_pruning_with_the_same_losses(tmp_path):
    """A checkpoint written during the pruning phase holds the kept ranks and the importance averages; resuming from
    it gives the same loss at every later step and the same final rank pattern as the uninterrupted run."""
    from datasets import Dataset
    from transformers import TrainerCallback, TrainingArguments
    rows = torch.randint(0, 64, (8, 9), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": rows.tolist(), "labels": rows.tolist()})

    def args(out):
        return TrainingArguments(output_dir=str(tmp_path / out), max_steps=14, per_device_train_batch_size=4,
                                 learning_rate=1e-2, save_steps=8, report_to=[], use_cpu=DEVICE.type == "cpu",
                                 logging_steps=1, lr_scheduler_type="constant", seed=0)

    def losses(trainer):
        return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}

    full = graftkit.get_peft_model(tiny_llama(), graftkit.AdaLoraConfig(**ADALORA))
    whole = graftkit.Trainer(model=full, args=args("full"), train_dataset=data)
    whole.train()
    checkpoint = tmp_path / "full" / "checkpoint-8"
    saved = json.loads((checkpoint / "adapter_config.json").read_text())["rank_pattern"]
    assert saved is not None and (checkpoint / "graftkit_training_state.safetensors").is_file()

    class StopAfterFirstCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            control.should_training_stop = True

    cut = graftkit.get_peft_model(tiny_llama(), graftkit.AdaLoraConfig(**ADALORA))
    graftkit.Trainer(model=cut, args=args("cut"), train_dataset=data, callbacks=[StopAfterFirstCheckpoint()]).train()
    resumed = graftkit.get_peft_model(tiny_llama(), graftkit.AdaLoraConfig(**ADALORA))
    again = graftkit.Trainer(model=resumed, args=args("cut"), train_dataset=data)
    again.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-8"))
    later = {s: v for s, v in losses(whole).items() if s > 8}
    assert len(later) == 6
    for step, value in later.items():
        assert abs(losses(again)[step] - value) <= 1e-6 * max(1.0, abs(value)), (step, losses(again)[step], value)
    assert resumed.peft_config["default"].rank_pattern == full.peft_config["default"].rank_pattern
    assert sum(map(sum, full.peft_config["default"].rank_pattern.values())) == 3 * 6


def test_adalora_penalty_reaches_a_smoothed_loss(tmp_path):
    """graftkit.Trainer computes a label-smoothed loss from the logits; AdaLoRA's penalty is added there too."""
    from transformers import TrainingArguments
    from transformers.trainer_pt_utils import LabelSmoother
    model = graftkit.get_peft_model(tiny_llama(), graftkit.AdaLoraConfig(init_lora_weights=False, **ADALORA))
    args = TrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=0.1, report_to=[],
                             use_cpu=DEVICE.type == "cpu")
    trainer = graftkit.Trainer(model=model, args=args)
    model.train()
    x = token_batch()
    outputs = model(**x)
    penalty = model.training_penalty()
    assert penalty > 0
    smoothed = LabelSmoother(epsilon=0.1)(outputs, x["input_ids"], shift_labels=True)
    torch.testing.assert_close(trainer.compute_loss_func(outputs, x["input_ids"]), smoothed + penalty)
    plain = model.get_base_model()(**x, labels=x["input_ids"]).loss
    torch.testing.assert_close(model(**x, labels=x["input_ids"]).loss, plain + penalty)


def test_adalora_dropout_uses_seeded_masks_and_trains_every_part():
    """With dropout, AdaLoRA's update runs through LoRA's seeded-dropout kernel: the same seed gives the same step,
    evaluation has no dropout, and Q, Λ and P all get gradients."""
    config = dict(ADALORA, lora_dropout=0.3, init_lora_weights=False)
    x = token_batch()

    def step(seed):
        model = graftkit.get_peft_model(tiny_llama(), graftkit.AdaLoraConfig(**config)).train()
        torch.manual_seed(seed)
        loss = model(**x, labels=x["input_ids"]).loss
        loss.backward()
        return model, loss.detach()

    model, first = step(0)
    _, again = step(0)
    _, other = step(1)
    assert torch.equal(first, again) and not torch.equal(first, other)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj.adapters["default"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (layer.lora_A, layer.lora_E, layer.lora_B))
    model.eval()
    reference = graftkit.get_peft_model(tiny_llama(), graftkit.AdaLoraConfig(**dict(config, lora_dropout=0.0)))
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(run(model, x), run(reference.eval(), x))


class Volumes(torch.nn.Module):
    """3-D convolutions (video, medical volumes): output scaling on the first, input scaling on the second."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(2, 4, 3, padding=1)
        self.mix = torch.nn.Conv3d(4, 4, 1)

    def forward(self, x):
        return self.mix(torch.relu(self.conv(x)))


def test_ia3_on_conv3d_matches_peft_forward_merge_and_files(tmp_path):
    x = torch.randn(2, 2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    models = {}
    for label, lib in (("ours", graftkit), ("peft", peft)):
        torch.manual_seed(0)
        model = lib.get_peft_model(Volumes(), lib.IA3Config(target_modules=["conv", "mix"], feedforward_modules=["mix"],
                                                            init_ia3_weights=False))
        set_seeded(model, seed=3)
        models[label] = model.eval()
    expected = models["peft"](x)
    torch.testing.assert_close(models["ours"](x), expected, rtol=0, atol=1e-5)
    torch.manual_seed(0)
    assert not torch.allclose(expected, Volumes()(x), atol=1e-3)  # the same base without the scales
    models["ours"].save_pretrained(tmp_path / "ours")
    torch.manual_seed(0)
    theirs = peft.PeftModel.from_pretrained(Volumes(), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(x), expected, rtol=0, atol=1e-5)
    models["ours"].merge_adapter()
    torch.testing.assert_close(models["ours"](x), expected, rtol=0, atol=1e-5)
    models["ours"].unmerge_adapter()
    torch.testing.assert_close(models["ours"](x), expected, rtol=0, atol=1e-5)


def test_adalora_on_conv2d_matches_peft_forward_merge_files_and_prunes(tmp_path):
    from tests.conftest import tiny_convnet

    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))

    def config(lib):
        return lib.AdaLoraConfig(target_modules=["conv", "conv1x1", "head"], init_r=4, target_r=2, total_step=20,
                                 tinit=2, tfinal=2, deltaT=1, init_lora_weights=False)

    torch.manual_seed(0)
    ours = graftkit.get_peft_model(tiny_convnet(), config(graftkit))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    ours.eval()
    expected = ours(x)
    assert not torch.allclose(expected, tiny_convnet()(x), atol=1e-4)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_convnet(), tmp_path).eval()
    torch.testing.assert_close(theirs(x), expected, rtol=0, atol=1e-5)
    reloaded = graftkit.PeftModel.from_pretrained(tiny_convnet(), tmp_path).eval()
    torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=1e-6)
    ours.merge_adapter()
    torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-5)
    ours.unmerge_adapter()
    ours.train()
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.01)
    for step in range(20):  # pruning runs through the conv layers' ranks as through the linear one's
        ours(x).square().mean().backward()
        opt.step()
        ours.update_and_allocate(step)
        opt.zero_grad()
    ranks = ours.peft_config["default"].rank_pattern
    assert set(ranks) == {"conv.lora_E", "conv1x1.lora_E", "head.lora_E"}
    assert sum(sum(kept) for kept in ranks.values()) == 2 * 3  # the final budget: target_r per layer
