"""``graftkit train --config`` against the same run written by hand with ``graftkit.Trainer``: time per step.

Both train LoRA (r=16, all-linear) on SmolLM2-135M-Instruct with the demo's pirate data, batch 8, the same
``TrainingArguments`` and the same encoded rows; each step's wall time is taken by a callback at ``on_step_end``.
The two variants alternate (run file then by hand, then the other way round, ...) and the median step of each is
reported, the first two steps of every run left out (warm-up). The CLI should add nothing to a step.

Usage::

    python benchmarks/bench_cli.py                   # 3 rounds of 20 steps each
    python benchmarks/bench_cli.py --rounds 1 --steps 10
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import warnings

import torch
import yaml
from transformers import TrainerCallback

warnings.filterwarnings("ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StepClock(TrainerCallback):
    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self.marks.append(time.perf_counter())

    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.marks[1:], self.marks[2:], strict=False)]  # drop the warm-up step


def run_file(folder: str, steps: int) -> list[float]:
    from graftkit import cli, runner

    clock = StepClock()
    original = runner._callbacks
    runner._callbacks = lambda output, stop: [*original(output, stop), clock]
    try:
        code = cli.main(["train", "--config", os.path.join(ROOT, "examples", "pirate.yaml"), "--output", folder,
                         "--set", f"training.max_steps={steps}", "--set", "training.eval_strategy=no",
                         "--set", "data.eval_fraction=null", "--set", "training.save_steps=100000",
                         "--set", "training.disable_tqdm=true"])
    finally:
        runner._callbacks = original
    assert code == 0
    return clock.steps()


def by_hand(folder: str, steps: int) -> list[float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments, set_seed

    import graftkit
    from graftkit.demo import default_model_dir
    from graftkit.recipe import _DATA, _TRAINING_DEFAULTS
    from graftkit.runner import PadCollator, encode_rows, read_rows

    path = default_model_dir(log=lambda *_: None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = read_rows([os.path.join(ROOT, "src", "graftkit", "data", "pirate.jsonl")], "data")
    encoded = encode_rows(tokenizer, rows, "prompt_response", _DATA)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    set_seed(0)
    model = graftkit.get_peft_model(model, graftkit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                               task_type="CAUSAL_LM"))
    with open(os.path.join(ROOT, "examples", "pirate.yaml"), encoding="utf-8") as handle:
        training = {**_TRAINING_DEFAULTS, **yaml.safe_load(handle)["training"]}
    training.update(max_steps=steps, eval_strategy="no", save_steps=100000, disable_tqdm=True)
    training.pop("eval_steps", None)
    clock = StepClock()
    trainer = graftkit.Trainer(model=model, args=TrainingArguments(output_dir=folder, **training),
                               train_dataset=encoded, data_collator=PadCollator(tokenizer.pad_token_id),
                               callbacks=[clock])
    trainer.train()
    return clock.steps()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"run file": [], "by hand": []}
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(args.rounds):  # alternate which goes first, so neither always runs on a fresh process
            order = ("run file", "by hand") if r % 2 == 0 else ("by hand", "run file")
            for name in order:
                run = run_file if name == "run file" else by_hand
                times[name] += run(os.path.join(scratch, f"{name.replace(' ', '')}{r}"), args.steps)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    print(f"# LoRA training step, SmolLM2-135M-Instruct fp32, batch 8, {args.rounds} x {args.steps} steps each, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print("| variant | median step (ms) | steps timed |")
    print("|---|---|---|")
    for name, value in ms.items():
        print(f"| {name} | {value:.0f} | {len(times[name])} |")
    print(f"run file / by hand: {ms['run file'] / ms['by hand']:.3f}")


if __name__ == "__main__":
    main()
