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

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "course")


def folder_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")) / 2**20


def one(variant: str, steps: int) -> dict[str, float | str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from graftkit import LoraConfig, get_peft_model, sft
    from graftkit.demo import default_model_dir, demo_pairs

    path = default_model_dir(log=lambda *_: None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    pairs = demo_pairs()
    train, held_out = pairs[:-32], pairs[-32:]
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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = sft.collate([sft.encode_pair(tokenizer, p, r, 96) for p, r in held_out], pad)
    with torch.no_grad():
        held = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss.item()
    with tempfile.TemporaryDirectory() as scratch:
        model.save_pretrained(scratch)
        size = folder_mb(scratch)
    return {"variant": variant, "trainable": trainable, "lr": lr, "step_s": seconds,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "train_loss": sum(losses[-5:]) / len(losses[-5:]), "held_out_loss": held, "disk_mb": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.steps)))
        return
    steps = 2 if args.smoke else args.steps
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
    os.makedirs(args.out, exist_ok=True)
    command = "python examples/course_lora_vs_full.py" + (" --smoke" if args.smoke else f" --steps {steps}")
    with open(os.path.join(args.out, "lora_vs_full.md"), "w", encoding="utf-8") as handle:
        handle.write(f"<!-- {command} -->\n" + "\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
