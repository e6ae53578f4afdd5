"""PEFT course, LoRA rank sweep on SmolLM2-135M-Instruct (CPU): r = 2, 4, 8, 16, 32, 64.

For each rank, LoRA on every linear layer (lora_alpha = 2r) trains the same number of steps on the demo's
pirate-persona answers from the same seed, and the script records the trainable parameters, the time per training
step, the peak memory of the process (each rank runs in a fresh subprocess, so the peaks do not mix) and the loss
on 32 held-out questions. It writes a Markdown table and a plot:

    python examples/course_rank_sweep.py                       # about 7 minutes on 2 cores
    python examples/course_rank_sweep.py --smoke --out /tmp/x  # two ranks, two steps: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from course_common import arguments, held_out_loss, smollm2, write_table


def one(rank: int, steps: int) -> dict[str, float]:
    """Train one rank in this process; report what it cost and what it reached."""
    import torch
    from transformers import AutoModelForCausalLM

    from graftkit import LoraConfig, get_peft_model, sft

    path, tokenizer, train, held_out = smollm2()
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable, total = model.get_nb_trainable_parameters()
    start = time.perf_counter()
    losses = sft.train(model, tokenizer, train, steps=steps, batch_size=8, lr=2e-3, seed=0, progress=False)
    seconds = (time.perf_counter() - start) / steps
    held = held_out_loss(model, tokenizer, held_out)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"r": rank, "trainable": trainable, "share": trainable / total, "step_s": seconds, "peak_mb": peak_mb,
            "train_loss": sum(losses[-5:]) / len(losses[-5:]), "held_out_loss": held}


def main() -> None:
    args, steps = arguments(__doc__, 20, ranks=dict(default="2,4,8,16,32,64"),
                            one=dict(type=int, help=argparse.SUPPRESS))
    if args.one is not None:
        print(json.dumps(one(args.one, steps)))
        return
    ranks = [2, 4] if args.smoke else [int(r) for r in args.ranks.split(",")]
    rows = []
    for rank in ranks:
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", str(rank), "--steps", str(steps)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"r={rank}: {rows[-1]}", flush=True)
    table = ["| r | trainable parameters | share of the model | s / step | peak memory (MB) | train loss (last 5) | "
             "held-out loss |", "|---|---|---|---|---|---|---|"]
    table += [f"| {r['r']} | {r['trainable']:,d} | {100 * r['share']:.2f}% | {r['step_s']:.2f} | {r['peak_mb']:.0f} | "
              f"{r['train_loss']:.3f} | {r['held_out_loss']:.3f} |" for r in rows]
    write_table(args.out, "rank_sweep", "course_rank_sweep.py", args, steps, table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    xs = [r["r"] for r in rows]
    left.plot(xs, [r["held_out_loss"] for r in rows], marker="o", label="held-out")
    left.plot(xs, [r["train_loss"] for r in rows], marker="o", label="train (last 5 steps)")
    left.set_xscale("log", base=2)
    left.set_xlabel("rank r")
    left.set_ylabel("loss")
    left.legend()
    right.plot(xs, [r["trainable"] / 1e6 for r in rows], marker="o", color="tab:green")
    right.set_xscale("log", base=2)
    right.set_xlabel("rank r")
    right.set_ylabel("trainable parameters (M)")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    fig.suptitle(f"LoRA rank sweep, SmolLM2-135M-Instruct, {steps} steps")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "rank_sweep.png"))


if __name__ == "__main__":
    main()
