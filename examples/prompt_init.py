"""Prompt tuning on SmolLM2-135M-Instruct (CPU): TEXT against RANDOM (and SAMPLE_VOCAB) initialisation.

Trains a 16-token prompt on the demo's pirate-persona answers for the same number of steps from each start and
prints the training loss at the start and the end, and the loss on held-out questions. Run from a checkout
after the README's demo command (it installs the model):

    python examples/prompt_init.py --steps 40
"""

from __future__ import annotations

import argparse
import statistics

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from graftkit import PromptTuningConfig, TaskType, get_peft_model, sft
from graftkit.demo import default_model_dir, demo_pairs

INIT_TEXT = "Answer every question like a pirate, starting with Arr! and ending with matey."


def held_out_loss(model, tokenizer, pairs) -> float:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = sft.collate([sft.encode_pair(tokenizer, p, r, 96) for p, r in pairs], pad_id)
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss.item()


def run(init: str, path: str, steps: int, lr: float, train_pairs, test_pairs) -> dict[str, float]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=16, prompt_tuning_init=init,
                                **({"prompt_tuning_init_text": INIT_TEXT, "tokenizer_name_or_path": path}
                                   if init == "TEXT" else {}))
    torch.manual_seed(0)
    model = get_peft_model(base, config)
    before = held_out_loss(model.eval(), tokenizer, test_pairs)
    losses = sft.train(model, tokenizer, train_pairs, steps=steps, batch_size=8, lr=lr, seed=0, progress=False)
    return {"held-out before": before, "first steps": statistics.mean(losses[:5]),
            "last steps": statistics.mean(losses[-5:]), "held-out after": held_out_loss(model, tokenizer, test_pairs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--inits", default="TEXT,RANDOM,SAMPLE_VOCAB")
    args = parser.parse_args()
    path = default_model_dir()
    pairs = demo_pairs()
    train_pairs, test_pairs = pairs[:-32], pairs[-32:]
    print(f"| init | held-out loss before | train loss, first 5 steps | train loss, last 5 steps | "
          f"held-out loss after {args.steps} steps |")
    print("|---|---|---|---|---|")
    for init in args.inits.split(","):
        r = run(init, path, args.steps, args.lr, train_pairs, test_pairs)
        print(f"| {init} | {r['held-out before']:.3f} | {r['first steps']:.3f} | {r['last steps']:.3f} | "
              f"{r['held-out after']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
