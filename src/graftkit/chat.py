"""``graftkit chat`` (a conversation in the terminal, streamed, with adapters to switch between) and
``graftkit eval`` (loss and perplexity of the base model and each adapter on the same data, in one table)."""

from __future__ import annotations

import math
import os
import sys
from typing import Any, TextIO

from .errors import ConfigError

COMMANDS = {"/reset": "forget the conversation", "/adapter NAME": "answer with adapter NAME",
            "/base": "answer with the base model (no adapter)", "/adapters": "list the loaded adapters",
            "/help": "this list", "/quit": "leave (or Ctrl-D)"}


def named_adapters(specs: list[str]) -> dict[str, str]:
    """``NAME=DIR`` or ``DIR`` (named after its folder) -> {name: dir}, names unique."""
    out: dict[str, str] = {}
    for spec in specs:
        name, _, folder = spec.rpartition("=") if "=" in spec else ("", "", spec)
        name = name or os.path.basename(os.path.normpath(folder)) or "adapter"
        if name in out:
            raise ConfigError(f"--adapter {spec}: the name '{name}' is taken; give it another with NAME=DIR")
        if not os.path.isdir(folder):
            raise ConfigError(f"--adapter {spec}: {folder} is not a folder")
        out[name] = folder
    return out


def load(model_dir: str | None, adapters: dict[str, str]) -> tuple[Any, Any]:
    """(model, tokenizer): the base model with every adapter loaded (the first one active), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import PeftModel
    from .demo import default_model_dir

    path = model_dir or default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    names = list(adapters)
    if names:
        model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapters[name], adapter_name=name)
        model.set_adapter(names[0])
        model.eval()
    return model, tokenizer


def _prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer(text)["input_ids"]


def reply(model: Any, tokenizer: Any, messages: list[dict[str, str]], adapter: str | None, out: TextIO,
          max_new_tokens: int = 256, temperature: float = 0.0) -> str:
    """Generate the assistant's next turn, streaming its text to ``out``; ``adapter`` None: the base model."""
    import contextlib

    import torch
    from transformers import TextStreamer

    class Stream(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    ids = torch.tensor([_prompt_ids(tokenizer, messages)])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    if hasattr(model, "peft_config"):
        if adapter is not None:
            model.set_adapter(adapter)
        scope = model.disable_adapter() if adapter is None else contextlib.nullcontext()
    else:
        scope = contextlib.nullcontext()
    with scope, torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                   pad_token_id=pad, streamer=Stream(tokenizer, skip_prompt=True,
                                                                     skip_special_tokens=True), **sampling)
    return tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True).strip()


def chat(model: Any, tokenizer: Any, adapters: list[str], lines: TextIO = sys.stdin, out: TextIO = sys.stdout,
         max_new_tokens: int = 256, temperature: float = 0.0, system: str | None = None) -> int:
    """The conversation loop: one user turn per line; commands start with '/'."""
    active: str | None = adapters[0] if adapters else None
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    interactive = lines.isatty()
    out.write(f"chatting with {'adapter ' + active if active else 'the base model'}; /help lists the commands\n")
    while True:
        if interactive:
            out.write(f"[{active or 'base'}] you> ")
            out.flush()
        line = lines.readline()
        if not line:
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, argument = text.partition(" ")
            if command == "/quit":
                return 0
            if command == "/reset":
                messages = list(start)
                out.write("(conversation cleared)\n")
            elif command == "/base":
                active = None
                out.write("(base model)\n")
            elif command == "/adapter":
                if argument.strip() not in adapters:
                    out.write(f"(no adapter '{argument.strip()}'; loaded: {', '.join(adapters) or 'none'})\n")
                else:
                    active = argument.strip()
                    out.write(f"(adapter {active})\n")
            elif command == "/adapters":
                out.write(f"(loaded: {', '.join(adapters) or 'none'}; answering with {active or 'the base model'})\n")
            else:
                out.write("".join(f"  {k:<14} {v}\n" for k, v in COMMANDS.items()))
            continue
        messages.append({"role": "user", "content": text})
        out.write(f"[{active or 'base'}] ")
        answer = reply(model, tokenizer, messages, active, out, max_new_tokens, temperature)
        messages.append({"role": "assistant", "content": answer})


def evaluate(model: Any, tokenizer: Any, rows: list[dict], batch_size: int = 8) -> tuple[float, int]:
    """(mean loss per learned token, learned tokens) of ``model`` on encoded rows."""
    import torch

    from .runner import PadCollator

    collate = PadCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i: i + batch_size])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                                       ignore_index=-100, reduction="sum")
            total += float(losses)
            count += int((targets != -100).sum())
    return total / max(count, 1), count


def eval_table(model: Any, tokenizer: Any, adapters: list[str], rows: list[dict], batch_size: int = 8) -> list[dict]:
    """One row per model: the base, then each adapter."""
    import contextlib

    results = []
    for name in [None, *adapters]:
        if name is not None:
            model.set_adapter(name)
        base = name is None and hasattr(model, "peft_config")
        with model.disable_adapter() if base else contextlib.nullcontext():
            loss, tokens = evaluate(model, tokenizer, rows, batch_size)
        results.append({"model": name or "base", "loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                        "tokens": tokens})
    return results
