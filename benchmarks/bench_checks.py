"""What graftkit's safety checks cost on a real model: SmolLM2-135M-Instruct with a LoRA adapter (r=16, all-linear).

Measured, each the median of ``--repeats`` runs in one process (interleaved, so drift hits all alike):

* ``read header``: parsing the safetensors header in Python into meta tensors (names, shapes, dtypes), which lets
  every shape be compared with the model before any tensor is read;
* ``check shapes``: the comparison itself (the model-size bound and the per-layer shapes the config implies);
* ``from_pretrained``: the whole load of the adapter onto a loaded base (the two rows above included), next to
  ``safetensors load_file``, the bare read of the same file that any loader pays;
* ``save_pretrained``: the whole save (staging folder, fsyncs, journal, per-folder lock);
* ``run-file preflight``: what ``graftkit train`` / ``--check`` adds before loading weights: the model built on the
  meta device with the adapter attached (targets), and every row rendered through the chat template.

Usage::

    python benchmarks/bench_checks.py [--repeats 15]
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

warnings.filterwarnings("ignore")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    import safetensors.torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    import graftkit
    from graftkit import io as gio
    from graftkit import model as gmodel
    from graftkit.demo import default_model_dir
    from graftkit.recipe import check
    from graftkit.runner import _attach_on_meta, _load_tokenizer, encode_rows, split_rows

    model_dir = default_model_dir()
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = graftkit.get_peft_model(base, graftkit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                                   init_lora_weights=False))
    folder = tempfile.mkdtemp()
    peft_model.save_pretrained(folder)
    weights = os.path.join(folder, gio.WEIGHTS_NAME)
    config = peft_model.peft_config["default"]
    fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prepared = graftkit.PeftModel._prepare_config_for(fresh, config)

    def check_shapes() -> None:
        meta = gmodel._with_prefix(gio._header(weights)[1])
        gmodel._check_header(fresh, meta, folder)
        gmodel._check_shapes_before_building(fresh, prepared, meta, True, folder)

    def load() -> None:
        graftkit.PeftModel.from_pretrained(fresh, folder).unload()

    data = os.path.join(os.path.dirname(graftkit.__file__), "data", "pirate.jsonl")
    recipe = check({"output": os.path.join(folder, "run"), "data": {"train": data},
                    "adapter": {"peft_type": "LORA", "r": 16, "target_modules": "all-linear"}}, "bench.yaml")
    model_config = AutoConfig.from_pretrained(model_dir)
    tokenizer = _load_tokenizer(model_dir)
    rows, _, fmt = split_rows(recipe)
    out_dir = os.path.join(folder, "again")
    variants = {
        "read header": lambda: gio._header(weights),
        "check shapes (from the header)": check_shapes,
        "safetensors load_file (the bare read)": lambda: safetensors.torch.load_file(weights),
        "from_pretrained (all of it)": load,
        "save_pretrained (all of it)": lambda: peft_model.save_pretrained(out_dir),
        "preflight: adapter on the meta-device model": lambda: _attach_on_meta(model_config, recipe),
        f"preflight: render {len(rows)} rows ({fmt})": lambda: encode_rows(tokenizer, rows, fmt, recipe.data),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    size = os.path.getsize(weights) / 2**20
    print(f"# Safety checks, SmolLM2-135M-Instruct fp32, LoRA r=16 all-linear ({size:.1f} MiB adapter), "
          f"{args.repeats} repeats, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{platform.machine()}\n")
    print("| step | median (ms) |")
    print("|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} |")


if __name__ == "__main__":
    main()
