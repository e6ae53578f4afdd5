"""PEFT course, LoRA against full fine-tuning on SmolLM2-135M-Instruct (CPU).

The same data (the demo's pirate-persona answers), steps, batch and seed; LoRA (r=16 on every linear layer) at
its usual learning rate, full fine-tuning at a full-model one. Each variant runs in a fresh subprocess so its peak
memory is its own. Reported: time per step, peak memory, the held-out loss, and what has to be stored afterwards
(the adapter against a whole model). Writes a Markdown table:

    python examples/course_lora_vs_full.py                       # about 6 minutes on 2 cores
    python examples/course_lora_vs_full.py --smoke --out /tmp/x  # two steps each
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from course_common import arguments, held_out_loss, smollm2, write_table


def folder_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")) / 2**20


def one(variant: str, steps: int) -> dict[str, float | str]:
    import torch
    from transformers import AutoModelForCausalLM

    from graftkit import LoraConfig, get_peft_model, sft

    path, tokenizer, train, held_out = smollm2()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if variant == "LoRA r=16":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
        lr = 2e-3
    else:
        lr = 5e-5
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    start = time.perf_counter()
    losses = sft.train(model, tokenizer, train, steps=steps, batch_size=8, lr=lr, seed=0, progress=False)
    seconds = (time.perf_counter() - start) / steps
    held = held_out_loss(model, tokenizer, held_out)
    with tempfile.TemporaryDirectory() as scratch:
        model.save_pretrained(scratch)
        size = folder_mb(scratch)
    return {"variant": variant, "trainable": trainable, "lr": lr, "step_s": seconds,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "train_loss": sum(losses[-5:]) / len(losses[-5:]), "held_out_loss": held, "disk_mb": size}


def main() -> None:
    args, steps = arguments(__doc__, 30, one=dict(help=argparse.SUPPRESS))
    if args.one:
        print(json.dumps(one(args.one, steps)))
        return
    rows = []
    for variant in ("LoRA r=16", "full fine-tuning"):
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", variant, "--steps", str(steps)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    table = ["| variant | trainable parameters | learning rate | s / step | peak memory (MB) | train loss (last 5) | "
             "held-out loss | saved (MB) |", "|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['variant']} | {r['trainable']:,d} | {r['lr']:g} | {r['step_s']:.2f} | {r['peak_mb']:.0f} | "
              f"{r['train_loss']:.3f} | {r['held_out_loss']:.3f} | {r['disk_mb']:.1f} |" for r in rows]
    write_table(args.out, "lora_vs_full", "course_lora_vs_full.py", args, steps, table)


if __name__ == "__main__":
    main()
