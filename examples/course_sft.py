"""PEFT course, LoRA supervised fine-tuning with TRL through ``graftkit.SFTTrainer`` on SmolLM2-135M-Instruct (CPU).

The demo's pirate-persona answers as chat prompt/completion rows (TRL learns the completions only), LoRA r=16 on
every linear layer, an eval split; the script writes the loss curve (train and eval), a table of the numbers and
the answers to two held-out questions before and after training:

    python examples/course_sft.py                       # about 4 minutes on 2 cores
    python examples/course_sft.py --smoke --out /tmp/x  # two steps
"""

from __future__ import annotations

import os
import tempfile

from course_common import arguments, smollm2, write_table


def main() -> None:
    args, steps = arguments(__doc__, 60)

    import torch
    from datasets import Dataset
    from trl import SFTConfig

    from graftkit import LoraConfig, SFTTrainer, sft
    from graftkit.runner import plot_losses

    path, tokenizer, train, held_out = smollm2()

    def rows(items):
        return Dataset.from_list([{"prompt": [{"role": "user", "content": p}],
                                   "completion": [{"role": "assistant", "content": r}]} for p, r in items])

    questions = [p for p, _ in held_out[:2]]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        config = SFTConfig(output_dir=scratch, max_steps=steps, per_device_train_batch_size=8, learning_rate=2e-3,
                           lr_scheduler_type="cosine", warmup_steps=0.1, logging_steps=max(1, steps // 12),
                           eval_strategy="steps", eval_steps=max(1, steps // 4), save_strategy="no", max_length=96,
                           report_to=[], use_cpu=True, seed=0)
        trainer = SFTTrainer(model=path, args=config, train_dataset=rows(train), eval_dataset=rows(held_out),
                             processing_class=tokenizer,
                             peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                    task_type="CAUSAL_LM"))
        model = trainer.model
        model.eval()
        before_eval = trainer.evaluate()["eval_loss"]
        before = [sft.generate(model, tokenizer, q, max_new_tokens=24) for q in questions]
        trainer.train()
        model.eval()
        after_eval = trainer.evaluate()["eval_loss"]
        after = [sft.generate(model, tokenizer, q, max_new_tokens=24) for q in questions]
        history = trainer.state.log_history
    os.makedirs(args.out, exist_ok=True)
    plot_losses(history, os.path.join(args.out, "sft_loss.png"))
    trainable, total = model.get_nb_trainable_parameters()
    train_losses = [h["loss"] for h in history if "loss" in h]
    lines = ["| | value |", "|---|---|",
             f"| trainable parameters | {trainable:,d} of {total:,d} ({100 * trainable / total:.2f}%) |",
             f"| held-out loss before / after {steps} steps | {before_eval:.3f} / {after_eval:.3f} |",
             f"| train loss, first / last log | {train_losses[0]:.3f} / {train_losses[-1]:.3f} |", "",
             "| question | before | after |", "|---|---|---|"]
    lines += [f"| {q} | {b} | {a} |" for q, b, a in zip(questions, before, after, strict=True)]
    write_table(args.out, "sft", "course_sft.py", args, steps, lines)


if __name__ == "__main__":
    main()
