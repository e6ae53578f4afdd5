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


def chat(model: Any, tokenizer: Any, adapters: list[str], lines: TextIO | None = None, out: TextIO | None = None,
         max_new_tokens: int = 256, temperature: float = 0.0, system: str | None = None) -> int:
    """The conversation loop: one user turn per line (``lines``: standard input by default); commands start
    with '/'."""
    lines = sys.stdin if lines is None else lines  # read at call time: the process's stdin may be replaced
    out = sys.stdout if out is None else out
    active: str | None = adapters[0] if adapters else None
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    interactive = lines.isatty()
    out.write(f"chatting with {'adapter ' + active if active else 'the base model'}; /help lists the commands\n")
    while True:
        if interactive:
            out.write(f"[{active or 'base'}] you> ")
            out.flush()
        line = _read_line(lines)
        if line is None:
            return 0
        if len(line) > MAX_LINE:
            out.write(f"(that message is {len(line):,d}+ characters; at most {MAX_LINE:,d} fit in a turn)\n")
            continue
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
        room = _context(model) - len(_prompt_ids(tokenizer, messages))
        if room < 1:
            messages.pop()
            out.write(f"(the conversation no longer fits the model's context of {_context(model):,d} tokens; "
                      "/reset to start again, or send a shorter message)\n")
            continue
        out.write(f"[{active or 'base'}] ")
        answer = reply(model, tokenizer, messages, active, out, min(max_new_tokens, room), temperature)
        messages.append({"role": "assistant", "content": answer})


MAX_LINE = 65_536  # characters in one user turn; a longer line is refused (its rest is read and dropped)


def _read_line(lines: TextIO) -> str | None:
    """The next line (``None`` at the end), read in bounded pieces: a line of megabytes is cut at
    :data:`MAX_LINE` + 1 characters (the caller refuses it) and its rest is discarded as it arrives.

    Raises:
        ConfigError: the input is not UTF-8 text (binary data piped in).
    """
    try:
        line = lines.readline(MAX_LINE + 1)
        if not line:
            return None
        if len(line) > MAX_LINE and not line.endswith("\n"):
            while True:  # drop the rest of this line
                rest = lines.readline(MAX_LINE)
                if not rest or rest.endswith("\n"):
                    break
        return line
    except UnicodeDecodeError as err:
        raise ConfigError(f"standard input is not UTF-8 text ({err.reason} at byte {err.start}); type or pipe text "
                          "lines") from None


def _context(model: Any) -> int:
    """The model's context length in tokens (a large bound where its config does not say)."""
    config = getattr(model, "config", None)
    value = getattr(getattr(config, "text_config", None) or config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else 1 << 20


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
