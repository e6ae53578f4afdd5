"""``graftkit train --config`` against the same run written by hand with ``graftkit.Trainer``: time per step.

Both train LoRA (r=16, all-linear) on SmolLM2-135M-Instruct with the demo's pirate data, batch 8, the same
``TrainingArguments`` and the same encoded rows (both log the same losses); a callback takes each step's wall and CPU
time at ``on_step_end``, the first two steps of every run left out (warm-up). Every run is a fresh Python process, as
a ``graftkit train`` command and a script of one's own both are.

This VM's speed drifts by 10-20% from minute to minute, more than the difference looked for, so by default
(``--mode paired``) each round starts both variants at once, one thread each, and lets them begin training together
(a file barrier at ``on_train_begin``, once both models are loaded): the drift then hits both alike.
``--mode sequential`` runs them one after the other with every thread, alternating which goes first. Reported: per
variant the median step over all rounds, the ratio of each round's medians (its spread is the noise), and the time
spent per step in the run file's own callbacks (the only code of the command line that runs during training). The
command line should add nothing to a step.

Usage::

    python benchmarks/bench_cli.py                      # 6 paired rounds of 10 steps each
    python benchmarks/bench_cli.py --mode sequential --rounds 4 --steps 15
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

import torch
import yaml
from transformers import TrainerCallback

warnings.filterwarnings("ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StepClock(TrainerCallback):
    """Wall and CPU time of every step (``on_step_end`` to ``on_step_end``); with a barrier folder, training starts
    only once every process of the round has reached it."""

    def __init__(self, barrier: str | None = None, name: str = "", parties: int = 2) -> None:
        self.marks: list[tuple[float, float]] = []
        self.barrier, self.name, self.parties = barrier, name, parties

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        if self.barrier is None:
            return
        open(os.path.join(self.barrier, self.name.replace(" ", "_")), "w").close()
        deadline = time.monotonic() + 900
        while len(os.listdir(self.barrier)) < self.parties:
            if time.monotonic() > deadline:
                raise SystemExit("bench_cli: the other run never reached the start of training")
            time.sleep(0.005)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self.marks.append((time.perf_counter(), time.process_time()))

    def steps(self, own: float = 0.0) -> dict:
        kept = self.marks[1:]  # the first interval starts at the second step: the first is warm-up
        return {"wall": [b[0] - a[0] for a, b in zip(kept, kept[1:], strict=False)],
                "cpu": [b[1] - a[1] for a, b in zip(kept, kept[1:], strict=False)],
                "own": own / max(1, len(self.marks))}


def _timed(callback: TrainerCallback, spent: list[float]) -> TrainerCallback:
    """``callback`` with every event it defines timed into ``spent``."""
    for event in ("on_step_begin", "on_step_end", "on_log", "on_save", "on_substep_end", "on_pre_optimizer_step",
                  "on_optimizer_step"):
        if getattr(type(callback), event) is not getattr(TrainerCallback, event):
            setattr(callback, event, _clocked(getattr(callback, event), spent))
    return callback


def _clocked(method: Any, spent: list[float]) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    return wrapped


def run_file(folder: str, steps: int, clock: StepClock) -> dict:
    from graftkit import cli, runner

    spent = [0.0]  # seconds inside the run file's own callbacks during training
    original = runner._callbacks
    runner._callbacks = lambda output, stop: [*(_timed(c, spent) for c in original(output, stop)), clock]
    try:
        code = cli.main(["train", "--config", os.path.join(ROOT, "examples", "pirate.yaml"), "--output", folder,
                         "--set", f"training.max_steps={steps}", "--set", "training.eval_strategy=no",
                         "--set", "data.eval_fraction=null", "--set", "training.save_steps=100000",
                         "--set", "training.disable_tqdm=true"])
    finally:
        runner._callbacks = original
    assert code == 0
    return clock.steps(spent[0])


def by_hand(folder: str, steps: int, clock: StepClock) -> dict:
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
    trainer = graftkit.Trainer(model=model, args=TrainingArguments(output_dir=folder, **training),
                               train_dataset=encoded, data_collator=PadCollator(tokenizer.pad_token_id),
                               callbacks=[clock])
    trainer.train()
    return clock.steps()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=["paired", "sequential"], default="paired")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # one run, in this process
    parser.add_argument("--barrier", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        if args.barrier:
            torch.set_num_threads(1)
        clock = StepClock(args.barrier, args.variant)
        with tempfile.TemporaryDirectory() as scratch:
            run = VARIANTS[args.variant](os.path.join(scratch, "run"), args.steps, clock)
        print("STEPS " + json.dumps(run))
        return
    times = {name: {"wall": [], "cpu": []} for name in VARIANTS}
    ratios: dict[str, list[float]] = {"wall": [], "cpu": []}
    own = []
    for r in range(args.rounds):
        order = sorted(VARIANTS, reverse=r % 2 == 1)  # sequential: alternate which goes first
        if args.mode == "paired":
            with tempfile.TemporaryDirectory() as barrier:
                started = {name: _start(name, args.steps, barrier) for name in order}
                runs = {name: _result(name, process) for name, process in started.items()}
        else:
            runs = {name: _result(name, _start(name, args.steps)) for name in order}
        medians = {}
        for name, run in runs.items():
            for kind in ("wall", "cpu"):
                times[name][kind] += run[kind]
            medians[name] = {kind: statistics.median(run[kind]) for kind in ("wall", "cpu")}
        own.append(runs["run file"]["own"])
        for kind in ("wall", "cpu"):
            ratios[kind].append(medians["run file"][kind] / medians["by hand"][kind])
        print(f"round {r + 1}: " + ", ".join(f"{k} {1000 * v['wall']:.0f} ms" for k, v in medians.items())
              + f", ratio {ratios['wall'][-1]:.3f} (CPU time {ratios['cpu'][-1]:.3f})", file=sys.stderr)
    ms = {name: {kind: 1000 * statistics.median(v) for kind, v in t.items()} for name, t in times.items()}
    threads = "1 thread each, run together" if args.mode == "paired" else f"{torch.get_num_threads()} threads, in turn"
    print(f"# LoRA training step, SmolLM2-135M-Instruct fp32, batch 8, {args.rounds} rounds x {args.steps} steps "
          f"({args.mode}: {threads}), torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print("| variant | median step, wall (ms) | median step, CPU time (ms) | steps timed |")
    print("|---|---|---|---|")
    for name, value in ms.items():
        print(f"| {name} | {value['wall']:.0f} | {value['cpu']:.0f} | {len(times[name]['wall'])} |")
    for kind in ("wall", "cpu"):
        print(f"run file / by hand, {kind}: {ms['run file'][kind] / ms['by hand'][kind]:.3f}; median of the rounds' "
              f"ratios {statistics.median(ratios[kind]):.3f} (each: " + ", ".join(f"{x:.3f}" for x in ratios[kind])
              + ")")
    print(f"run file's own callbacks: {1e6 * statistics.median(own):.0f} us per step")


def _start(variant: str, steps: int, barrier: str | None = None) -> subprocess.Popen:
    """One run in its own Python process, as ``graftkit train`` and a script of one's own both run."""
    command = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--steps", str(steps)]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if barrier:
        command += ["--barrier", barrier]
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _result(variant: str, process: subprocess.Popen) -> dict:
    out, err = process.communicate()
    lines = [line for line in out.splitlines() if line.startswith("STEPS ")]
    if process.returncode != 0 or not lines:
        raise SystemExit(f"bench_cli: the {variant} run failed (exit {process.returncode}):\n{err[-3000:]}")
    return json.loads(lines[-1][6:])


VARIANTS = {"run file": run_file, "by hand": by_hand}

if __name__ == "__main__":
    main()
