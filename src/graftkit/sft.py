"""A small supervised fine-tuning loop for prompt/response pairs: what ``graftkit train`` and the demo run.

Loss is taken on response tokens only (prompt tokens are masked with -100), the prompt is rendered with
the tokenizer's chat template when it has one, and only parameters that require grad are optimized.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError

IGNORE_INDEX = -100


def load_pairs(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """Read a JSONL file of ``{"prompt": ..., "response": ...}`` rows.

    Raises:
        ConfigError: a row is not JSON or lacks one of the two keys (the message names file and line).
    """
    pairs = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append((str(row["prompt"]), str(row["response"])))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConfigError(
                    f"{path}:{number}: expected a JSON object with 'prompt' and 'response' "
                    f"({type(exc).__name__}: {exc})"
                ) from None
    if not pairs:
        raise ConfigError(f"{path}: no examples")
    return pairs


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt, ready for the model to answer (chat template when the tokenizer has one)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(f"Question: {prompt}\nAnswer:", add_special_tokens=True)["input_ids"]


def encode_pair(tokenizer, prompt: str, response: str, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with the prompt masked out and an end-of-turn token closing the response."""
    head = prompt_ids(tokenizer, prompt)
    end = tokenizer.eos_token or ""
    sep = "" if getattr(tokenizer, "chat_template", None) else " "
    tail = tokenizer(sep + response + end, add_special_tokens=False)["input_ids"]
    ids = (head + tail)[:max_length]
    labels = ([IGNORE_INDEX] * len(head) + tail)[:max_length]
    return ids, labels


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T)


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """Right-pad rows into one batch; padding is masked in attention and in the loss."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        mask[i, : len(row_ids)] = 1
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
    return Batch(ids, mask, labels)


def batches(encoded: list, batch_size: int, steps: int, seed: int) -> Iterator[list]:
    """``steps`` batches drawn from shuffled epochs (a new shuffle each time the data runs out)."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(encoded)))
            rng.shuffle(fresh)
            order += fresh
        take, order = order[:batch_size], order[batch_size:]
        yield [encoded[i] for i in take]


def _lr_factor(step: int, steps: int) -> float:
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(
    model: nn.Module,
    tokenizer,
    pairs: list[tuple[str, str]],
    steps: int = 60,
    batch_size: int = 8,
    lr: float = 2e-3,
    max_length: int = 96,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Fine-tune the trainable parameters of ``model`` on ``pairs``; returns the loss of every step.

    AdamW, linear warm-up over the first 10% of steps, cosine decay after it, gradient clipping at 1.0.

    Raises:
        ConfigError: nothing in the model is trainable.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters; was the adapter loaded with is_trainable=False?")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    encoded = [encode_pair(tokenizer, p, r, max_length) for p, r in pairs]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps))
    torch.manual_seed(seed)
    model.train()
    losses: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="training", unit="step")
    device = params[0].device
    allocate = getattr(model, "update_and_allocate", None)  # a graftkit model; a plain one trains in full
    for step, rows in enumerate(batches(encoded, batch_size, steps, seed)):
        batch = collate(rows, pad_id)
        out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                    labels=batch.labels.to(device))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if allocate is not None:
            allocate(step)  # per-step work of the method (AdaLoRA's rank allocation), gradients live
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
    if bar is not None:
        bar.close()
    model.eval()
    return losses


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy answer to one prompt, decoded without special tokens."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(tokenizer, prompt)], device=device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
