"""transformers.Trainer trains a graftkit model with default arguments (remove_unused_columns=True)."""

from __future__ import annotations

import warnings

import torch

import graftkit


def test_trainer_trains_with_default_arguments(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, initializer_range=0.2))
    model = graftkit.get_peft_model(base, graftkit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                              task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(8):
        ids = torch.randint(0, 64, (12,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "text": "dropped"})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=4, learning_rate=2e-2,
                             save_strategy="no", report_to=[], logging_steps=1, use_cpu=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert model.get_nb_trainable_parameters()[0] > 0
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)
