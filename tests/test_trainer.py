"""graftkit.Trainer: adapter-only checkpoints, resume, best-model loading, QLoRA, label smoothing and gradient
checkpointing, against an uninterrupted run and against HF peft + transformers.Trainer on the same data."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

import graftkit
from tests.conftest import randomize_adapters

warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")

from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
    TrainerCallback,
    TrainingArguments,
)

VOCAB = 64


def tied_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, initializer_range=0.2,
                                        tie_word_embeddings=True))


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
                                               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def rows(n: int = 16, seed: int = 1, seq2seq: bool = False) -> list[dict]:
    """Sequences with a learnable pattern (each token repeats the previous one plus 1)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(2, VOCAB, (1,), generator=g)
        ids = (start + torch.arange(12)) % (VOCAB - 2) + 2
        row = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        if seq2seq:
            row["labels"] = (ids + 1) % (VOCAB - 2) + 2
        out.append(row)
    return out


def lora(**kwargs) -> graftkit.LoraConfig:
    return graftkit.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **kwargs})


def arguments(path, **kwargs) -> TrainingArguments:
    base = dict(output_dir=str(path), per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                logging_steps=1, use_cpu=True, seed=0, disable_tqdm=True,
                save_strategy="steps" if "save_steps" in kwargs else "no")
    return TrainingArguments(**{**base, **kwargs})


class StopAfter(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def losses(trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def logits(model, seed: int = 5) -> torch.Tensor:
    ids = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoints_hold_every_adapter_and_load_in_graftkit_and_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = graftkit.get_peft_model(tied_llama(), lora())
    model.add_adapter("other", lora(r=2, target_modules=["q_proj"], init_lora_weights=False))
    randomize_adapters(model, seed=4, std=0.05)  # the frozen second adapter is non-zero too
    trainer = graftkit.Trainer(model=model, args=arguments(tmp_path, max_steps=4, save_steps=2), train_dataset=rows())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "checkpoint-2", tmp_path / "checkpoint-4", tmp_path / "final"):
        files = set(os.listdir(folder))
        assert {"adapter_config.json", "adapter_model.safetensors", "other"} <= files, files
        assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
        assert sorted(os.listdir(folder / "other")) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = load_file(tmp_path / "final" / "adapter_model.safetensors")
    live = model.get_adapter_state_dict("default")
    assert set(saved) == set(live) and all(torch.equal(saved[k], live[k].detach()) for k in saved)
    assert all(saved[k].abs().sum() > 0 for k in saved if "lora_B" in k)  # trained: B moved off zero
    expected = logits(model.eval())
    ours = graftkit.PeftModel.from_pretrained(tied_llama(), tmp_path / "final")
    ours.load_adapter(tmp_path / "final" / "other", adapter_name="other")
    theirs = peft.PeftModel.from_pretrained(tied_llama(), tmp_path / "final").eval()
    theirs.load_adapter(tmp_path / "final" / "other", adapter_name="other")
    torch.testing.assert_close(logits(ours), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(theirs), expected, atol=1e-6, rtol=0)
    ours.set_adapter("other")
    theirs.set_adapter("other")
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-6, rtol=0)


@pytest.mark.parametrize("how", ["path", "True"])
def test_resume_continues_the_uninterrupted_loss_curve(tmp_path, how):
    def trainer(path, max_steps):
        model = graftkit.get_peft_model(tied_llama(), lora(lora_dropout=0.1))  # dropout: RNG state must resume too
        args = arguments(path, max_steps=max_steps, save_steps=3, lr_scheduler_type="linear", warmup_steps=2)
        return graftkit.Trainer(model=model, args=args, train_dataset=rows())

    full = trainer(tmp_path / "full", 8)
    full.train()
    interrupted = trainer(tmp_path / "run", 8)
    interrupted.add_callback(StopAfter(3))  # the run dies after its first checkpoint
    interrupted.train()
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-3"]
    resumed = trainer(tmp_path / "run", 8)
    resumed.train(resume_from_checkpoint=True if how == "True" else str(tmp_path / "run" / "checkpoint-3"))
    expected = losses(full)
    got = {step: loss for step, loss in losses(resumed).items() if step > 3}
    assert sorted(got) == [4, 5, 6, 7, 8]
    for step in got:
        assert abs(got[step] - expected[step]) <= 1e-6, (step, got[step], expected[step])
    assert expected[8] < expected[1]
    for key, value in full.model.get_adapter_state_dict().items():
        torch.testing.assert_close(resumed.model.get_adapter_state_dict()[key], value, atol=1e-6, rtol=0)


PROMPT_METHODS = {
    "prompt_tuning": lambda: graftkit.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    "prefix_tuning": lambda: graftkit.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    "adaption_prompt": lambda: graftkit.AdaptionPromptConfig(adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM"),
}


@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_prompt_methods_train_checkpoint_and_resume(tmp_path, method):
    def trainer(path, max_steps):
        model = graftkit.get_peft_model(tied_llama(), PROMPT_METHODS[method]())
        rate = 0.3 if method == "adaption_prompt" else 5e-2  # its gates start at zero
        args = arguments(path, max_steps=max_steps, save_steps=3, learning_rate=rate)
        return graftkit.Trainer(model=model, args=args, train_dataset=rows())

    full = trainer(tmp_path / "full", 6)
    full.train()
    saved = load_file(tmp_path / "full" / "checkpoint-3" / "adapter_model.safetensors")
    if method != "adaption_prompt":
        assert list(saved) == ["prompt_embeddings"]
    else:
        assert sorted(saved)[0].endswith("self_attn.adaption_gate") and len(saved) == 4
    interrupted = trainer(tmp_path / "run", 6)
    interrupted.add_callback(StopAfter(3))
    interrupted.train()
    resumed = trainer(tmp_path / "run", 6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    expected, got = losses(full), losses(resumed)
    for step in (4, 5, 6):
        assert abs(got[step] - expected[step]) <= 1e-6, (step, got[step], expected[step])
    assert expected[6] < expected[1]


def test_resume_needs_the_adapters_of_the_model(tmp_path):
    model = graftkit.get_peft_model(tied_llama(), lora())
    graftkit.Trainer(model=model, args=arguments(tmp_path, max_steps=2, save_steps=2), train_dataset=rows()).train()
    other = graftkit.get_peft_model(tied_llama(), lora())
    other.add_adapter("extra", lora())
    before = {k: v.clone() for k, v in other.get_adapter_state_dict().items()}
    trainer = graftkit.Trainer(model=other, args=arguments(tmp_path / "b", max_steps=4), train_dataset=rows())
    with pytest.raises(graftkit.CheckpointError, match="extra"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert all(torch.equal(v, other.get_adapter_state_dict()[k]) for k, v in before.items())  # nothing half-loaded


# ---------------------------------------------------------------------------------------------- quick-tour flow
@pytest.mark.parametrize("task", ["CAUSAL_LM", "SEQ_2_SEQ_LM"])
def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path, task):
    seq2seq = task == "SEQ_2_SEQ_LM"
    base = tiny_t5() if seq2seq else tied_llama()
    targets = ["q", "v"] if seq2seq else ["q_proj", "v_proj"]
    model = graftkit.get_peft_model(base, lora(target_modules=targets, task_type=task))
    # "Best" is the highest eval loss here, so that the best checkpoint is the first epoch's, not the last one.
    args = arguments(tmp_path, num_train_epochs=3, eval_strategy="epoch", save_strategy="epoch",
                     load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True,
                     learning_rate=2e-2)
    trainer = graftkit.Trainer(model=model, args=args, train_dataset=rows(seq2seq=seq2seq),
                               eval_dataset=rows(8, seed=2, seq2seq=seq2seq))
    trainer.train()
    evals = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    assert len(evals) == 3 and evals[0] == max(evals) and evals[-1] < evals[0]  # training lowered the eval loss
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-4")  # 16 rows, batch 4: epoch 1 ends at step 4
    saved = load_file(os.path.join(best, "adapter_model.safetensors"))
    live = model.get_adapter_state_dict()
    assert all(torch.equal(saved[k], live[k].detach().cpu()) for k in saved)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(evals[0], abs=1e-6)
    assert any(p.requires_grad for p in model.parameters())  # still trainable after loading the best adapter


# ---------------------------------------------------------------------------------------------- QLoRA
def _four_bit(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = tmp_path / "base"
    if not folder.exists():
        tied_llama().save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))


def test_qlora_trains_checkpoints_and_resumes(tmp_path):
    def trainer(max_steps):
        base = graftkit.prepare_model_for_kbit_training(_four_bit(tmp_path), use_gradient_checkpointing=False)
        model = graftkit.get_peft_model(base, lora())
        return graftkit.Trainer(model=model, args=arguments(tmp_path / "run", max_steps=max_steps, save_steps=3),
                                train_dataset=rows())

    full = trainer(6)
    full.train()
    assert "adapter_model.safetensors" in os.listdir(tmp_path / "run" / "checkpoint-3")
    expected = losses(full)
    assert expected[6] < expected[1]
    resumed = trainer(6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    got = {step: loss for step, loss in losses(resumed).items() if step > 3}
    assert sorted(got) == [4, 5, 6]
    assert all(abs(got[s] - expected[s]) <= 1e-5 for s in got), (got, expected)


def test_quantized_model_with_only_frozen_adapters_is_refused(tmp_path):
    base = _four_bit(tmp_path)
    model = graftkit.get_peft_model(base, lora(inference_mode=True))
    with pytest.raises(graftkit.GraftkitError, match="no trainable adapter"):
        graftkit.Trainer(model=model, args=arguments(tmp_path), train_dataset=rows())


# ---------------------------------------------------------------------------------------------- loss set-up
def test_label_smoothing_matches_peft_and_trainer(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import Trainer as PlainTrainer

    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    args = dict(max_steps=3, label_smoothing_factor=0.1)
    theirs = peft.get_peft_model(tied_llama(), peft.LoraConfig(**kwargs))
    randomize_adapters(theirs, seed=7, std=0.05)
    theirs.save_pretrained(tmp_path / "start")
    reference = PlainTrainer(model=theirs, args=arguments(tmp_path / "p", **args), train_dataset=rows())
    reference.train()
    ours = graftkit.PeftModel.from_pretrained(tied_llama(), tmp_path / "start", is_trainable=True)
    trainer = graftkit.Trainer(model=ours, args=arguments(tmp_path / "g", **args), train_dataset=rows())
    trainer.train()
    expected, got = losses(reference), losses(trainer)
    assert sorted(got) == [1, 2, 3]
    for step in got:
        assert abs(got[step] - expected[step]) <= 1e-5, (step, got[step], expected[step])


def test_gradient_checkpointing_argument_trains_the_same_adapter(tmp_path):
    adapters = []
    for checkpointing in (False, True):
        model = graftkit.get_peft_model(tied_llama(), lora())
        args = arguments(tmp_path / str(checkpointing), max_steps=4, gradient_checkpointing=checkpointing)
        graftkit.Trainer(model=model, args=args, train_dataset=rows()).train()
        assert model.get_base_model().is_gradient_checkpointing == checkpointing
        adapters.append(model.get_adapter_state_dict())
    assert all(adapters[0][k].abs().sum() > 0 for k in adapters[0] if "lora_B" in k)
    for key, value in adapters[0].items():
        torch.testing.assert_close(adapters[1][key], value, atol=1e-6, rtol=0, msg=key)


# ---------------------------------------------------------------------------------------------- plain trainers
def test_plain_trainer_trains_with_default_arguments(tmp_path):
    """transformers.Trainer itself still trains a graftkit model (remove_unused_columns=True by default); it warns
    that graftkit.Trainer is needed for checkpoints."""
    from transformers import Trainer as PlainTrainer

    model = graftkit.get_peft_model(tied_llama(), lora(r=8, lora_alpha=16, task_type="CAUSAL_LM"))
    data = [{**row, "text": "dropped"} for row in rows(8)]
    trainer = PlainTrainer(model=model, args=arguments(tmp_path, max_steps=30, learning_rate=2e-2), train_dataset=data)
    with pytest.warns(UserWarning, match="graftkit.Trainer"):
        trainer.train()
    curve = list(losses(trainer).values())
    assert len(curve) == 30 and sum(curve[-5:]) < 0.5 * sum(curve[:5]), curve
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_plain_trainer_checkpoint_is_a_clear_error(tmp_path):
    from transformers import Trainer as PlainTrainer

    model = graftkit.get_peft_model(tied_llama(), lora())
    trainer = PlainTrainer(model=model, args=arguments(tmp_path, max_steps=2, save_steps=2), train_dataset=rows())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(graftkit.GraftkitError, match="graftkit.Trainer"):
            trainer.train()
    model.state_dict()  # outside the plain Trainer's save, state_dict works as usual


# ---------------------------------------------------------------------------------------------- load_adapter
def test_load_adapter_into_an_existing_adapter_replaces_its_weights(tmp_path):
    source = graftkit.get_peft_model(tied_llama(), lora())
    randomize_adapters(source, seed=8)
    source.save_pretrained(tmp_path / "a")
    model = graftkit.get_peft_model(tied_llama(), lora())
    model.load_adapter(tmp_path / "a", adapter_name="default")
    torch.testing.assert_close(logits(model.eval()), logits(source.eval()), atol=0, rtol=0)
    assert model.active_adapters == ["default"] and any(p.requires_grad for p in model.parameters())
    # A different config is refused, naming the field, and leaves the adapter as it was.
    graftkit.get_peft_model(tied_llama(), lora(lora_alpha=16)).save_pretrained(tmp_path / "b")
    before = logits(model)
    with pytest.raises(graftkit.ConfigError, match="lora_alpha"):
        model.load_adapter(tmp_path / "b", adapter_name="default")
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)


def test_sft_trainer_without_trl_names_the_package(monkeypatch):
    import sys

    import graftkit

    monkeypatch.setitem(sys.modules, "trl", None)  # as if TRL were not installed
    monkeypatch.delitem(sys.modules, "graftkit.integrations.trl", raising=False)
    with pytest.raises(graftkit.MissingPackageError, match="pip install trl"):
        from graftkit import SFTTrainer  # noqa: F401
    assert "SFTTrainer" not in graftkit.__all__  # `from graftkit import *` works without TRL
