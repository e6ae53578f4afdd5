"""What the course scripts share: their command line, the model and data, and where their tables go."""

from __future__ import annotations

import argparse
import os

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "course")


def arguments(doc: str, steps: int, **extra: dict) -> tuple[argparse.Namespace, int]:
    """(args, steps): ``--steps`` (default ``steps``), ``--out`` (default docs/course), ``--smoke`` (2 steps), and
    ``extra`` options as ``name=dict(argparse keywords)``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--out", default=OUT, help="where the table (and plot) go")
    parser.add_argument("--smoke", action="store_true", help="two steps: checks that the script runs")
    for name, options in extra.items():
        parser.add_argument(f"--{name}", **options)
    args = parser.parse_args()
    return args, 2 if args.smoke else args.steps


def smollm2():
    """(path, tokenizer, train pairs, 32 held-out pairs): the embedded model and the demo's pirate answers."""
    from transformers import AutoTokenizer

    from graftkit.demo import default_model_dir, demo_pairs

    path = default_model_dir(log=lambda *_: None)
    pairs = demo_pairs()
    return path, AutoTokenizer.from_pretrained(path), pairs[:-32], pairs[-32:]


def held_out_loss(model, tokenizer, pairs) -> float:
    import torch

    from graftkit import sft

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = sft.collate([sft.encode_pair(tokenizer, p, r, 96) for p, r in pairs], pad)
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss.item()


def write_table(out: str, name: str, script: str, args: argparse.Namespace, steps: int, lines: list[str]) -> None:
    """``out/name.md``: the table, headed by the command that made it."""
    os.makedirs(out, exist_ok=True)
    command = f"python examples/{script}" + (" --smoke" if args.smoke else f" --steps {steps}")
    with open(os.path.join(out, f"{name}.md"), "w", encoding="utf-8") as handle:
        handle.write(f"<!-- {command} -->\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
