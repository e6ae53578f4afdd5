"""graftkit.Trainer under DDP (torchrun, 2 CPU processes over gloo): train, or stop after the first checkpoint,
or resume from it; rank 0 writes the logged losses to OUT/losses.json.

    torchrun --nproc_per_node 2 tests/distributed/trainer_resume.py {full,stop,resume} OUT
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

import graftkit

warnings.simplefilter("ignore")


class StopAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= 3:
            control.should_training_stop = True
        return control


def main() -> None:
    faulthandler.dump_traceback_later(150, exit=True)
    mode, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, initializer_range=0.2))
    model = graftkit.get_peft_model(base, graftkit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                              lora_dropout=0.1))
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(32):
        ids = torch.randint(0, 64, (12,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    args = TrainingArguments(output_dir=out, max_steps=6, per_device_train_batch_size=2, learning_rate=1e-2,
                             save_strategy="steps", save_steps=3, report_to=[], logging_steps=1, use_cpu=True,
                             seed=0, disable_tqdm=True, ddp_backend="gloo")
    trainer = graftkit.Trainer(model=model, args=args, train_dataset=rows)
    if mode == "stop":
        trainer.add_callback(StopAt())
    trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
    assert trainer.args.world_size == 2, trainer.args.world_size
    if trainer.is_world_process_zero():
        losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
        with open(os.path.join(out, f"losses-{mode}.json"), "w") as fh:
            json.dump(losses, fh)


if __name__ == "__main__":
    from launch import run_and_exit

    run_and_exit(main)
