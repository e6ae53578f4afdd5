"""What ``graftkit train --config run.yaml`` runs: read and check the data, load the model (optionally quantized),
attach the adapter, train with :class:`graftkit.Trainer`, and leave a complete run folder behind.

The run folder holds ``checkpoint-N/`` (adapter-only, resumable), the final adapter (``adapter_config.json`` and
``adapter_model.safetensors``, readable by HF peft), ``run.yaml`` (the run as it happened, defaults included),
``metrics.jsonl`` (one JSON object per log), ``loss.png`` (train and eval loss) and ``README.md`` (an adapter card);
``--merge`` adds ``merged/`` (the base model with the adapter folded in, and its tokenizer).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import random
import signal
import tempfile
import time
from typing import Any

from .errors import ConfigError, GraftkitError, MissingPackageError
from .recipe import Recipe
from .sft import IGNORE_INDEX, encode_pair

# --------------------------------------------------------------------------------------------------------- data


def read_rows(paths: list[str], where: str) -> list[dict[str, Any]]:
    """Rows of JSONL/JSON/CSV/Parquet/text files or ``datasets.save_to_disk`` folders (text files: one row per
    non-empty line, as ``{"text": line}``)."""
    from .config import check_regular_file
    from .recipe import read_text

    rows: list[dict[str, Any]] = []
    for path in paths:
        if os.path.isdir(path):
            rows += _from_disk(path, where)
            continue
        check_regular_file(path, f"{where}", ConfigError)  # a FIFO would block the run forever
        ext = os.path.splitext(path)[1].lower()
        if ext in (".jsonl", ".json"):
            rows += _json_rows(path, read_text(path, "the data file"))
        elif ext == ".csv":
            rows += [dict(r) for r in csv.DictReader(io.StringIO(read_text(path, "the data file"), newline=""))]
        elif ext == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError as err:
                raise MissingPackageError(f"{where}: reading {path} needs pyarrow: pip install 'graftkit[train]'") \
                    from err
            rows += pq.read_table(path).to_pylist()
        elif ext in (".txt", ".text", ".md"):
            rows += [{"text": line} for line in read_text(path, "the data file").split("\n") if line.strip()]
        else:
            raise ConfigError(f"{where}: {path}: unknown file kind '{ext}'; use .jsonl, .json, .csv, .parquet, .txt "
                              "or a datasets.save_to_disk folder")
    if not rows:
        raise ConfigError(f"{where}: no rows in {paths}")
    return rows


def _json_rows(path: str, text: str) -> list[dict[str, Any]]:
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        except RecursionError:
            raise ConfigError(f"{path}: nested too deeply to read") from None
        rows = data
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{number}: not a JSON object ({err.msg})") from None
            except RecursionError:
                raise ConfigError(f"{path}:{number}: nested too deeply to read") from None
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ConfigError(f"{path}: row {number} is a {type(row).__name__}, expected an object")
    return rows


def _from_disk(path: str, where: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as err:
        raise MissingPackageError(f"{where}: reading the folder {path} needs datasets: pip install "
                                  "'graftkit[train]'") from err
    try:
        loaded = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{where}: {path} is not a datasets.save_to_disk folder ({err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ConfigError(f"{where}: {path} holds splits {list(loaded)}; name the one to use (save it alone)")
        loaded = loaded["train"]
    return loaded.to_list()


def detect_format(rows: list[dict[str, Any]], data: dict[str, Any], where: str) -> str:
    """The data format: the configured one, or the first row's (messages, prompt/response, text); every row is
    checked to hold what the format needs."""
    fmt = data["format"]
    first = rows[0]
    if fmt == "auto":
        if data["messages_field"] in first:
            fmt = "messages"
        elif data["prompt_field"] in first and data["response_field"] in first:
            fmt = "prompt_response"
        elif data["text_field"] in first:
            fmt = "text"
        else:
            raise ConfigError(f"{where}: cannot tell the data format from the first row's columns {sorted(first)}; "
                              f"expected '{data['messages_field']}', '{data['prompt_field']}'+'"
                              f"{data['response_field']}' or '{data['text_field']}' (or set data.format and the "
                              "*_field names)")
    need = {"messages": [data["messages_field"]], "prompt_response": [data["prompt_field"], data["response_field"]],
            "text": [data["text_field"]]}[fmt]
    for number, row in enumerate(rows, 1):
        missing = [k for k in need if k not in row or row[k] is None]
        if missing:
            columns = sorted(k for k in row if k != SOURCE)
            raise ConfigError(f"{_row_name(where, row, number)} has no {missing} (columns: {columns})")
        if fmt == "messages":
            _check_messages(row[need[0]], _row_name(where, row, number))
    return fmt


SOURCE = "__graftkit_source__"  # set on rows by split_rows: the file and row they came from, for messages


def _row_name(where: str, row: dict[str, Any], number: int) -> str:
    return f"{where}: {row[SOURCE]}" if SOURCE in row else f"{where}: row {number}"


def _read_labelled(paths: list[str], where: str) -> list[dict[str, Any]]:
    """:func:`read_rows`, each row labelled with its file and its number there (for error messages)."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        part = read_rows([path], where)
        for number, row in enumerate(part, 1):
            row[SOURCE] = f"{path}: row {number}"
        rows += part
    return rows


ROLES = ("system", "user", "assistant", "tool", "developer", "function", "ipython")  # what chat templates know


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    for number, turn in enumerate(messages, 1):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise ConfigError(f"{where}: message {number}: each message needs 'role' and 'content', got {turn!r:.80}")
        if turn["role"] not in ROLES:
            raise ConfigError(f"{where}: message {number}: role {turn['role']!r:.40} is not one of {', '.join(ROLES)}")
        if not isinstance(turn["content"], str):
            raise ConfigError(f"{where}: message {number}: content must be text, got {type(turn['content']).__name__} "
                              f"{turn['content']!r:.40}")
    if not any(turn["role"] == "assistant" for turn in messages):
        raise ConfigError(f"{where}: no assistant turn to learn from")


def encode_messages(tokenizer: Any, messages: list[dict[str, Any]], max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation rendered with the tokenizer's chat template; only the assistant turns
    are learned (each turn's tokens are the difference between the rendering up to it with a generation prompt and
    the rendering including it)."""
    def render(turns: list[dict[str, Any]], prompt: bool) -> list[int]:
        ids = tokenizer.apply_chat_template(turns, add_generation_prompt=prompt, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    ids = render(messages, False)
    labels = [IGNORE_INDEX] * len(ids)
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        start = len(render(messages[:i], True))
        end = len(render(messages[: i + 1], False))
        labels[start:end] = ids[start:end]
    return ids[:max_length], labels[:max_length]


def encode_rows(tokenizer: Any, rows: list[dict[str, Any]], fmt: str, data: dict[str, Any],
                where: str = "data") -> list[dict]:
    """Every row as ``input_ids``/``labels`` (only the answers learned); a row the chat template or the tokenizer
    cannot render is a :class:`ConfigError` naming it, before any weight loads."""
    if fmt == "messages" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data.format is messages but the tokenizer has no chat template; use prompt/response or "
                          "text rows, or a model with a chat template")
    out = []
    for number, row in enumerate(rows, 1):
        try:
            ids, labels = _encode_row(tokenizer, row, fmt, data)
        except GraftkitError:
            raise
        except Exception as err:  # noqa: BLE001 - chat templates (jinja2) and tokenizers raise many types
            text = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
            raise ConfigError(f"{_row_name(where, row, number)}: the tokenizer cannot render this row "
                              f"({type(err).__name__}: {text})") from None
        if any(label != IGNORE_INDEX for label in labels):
            out.append({"input_ids": ids, "labels": labels})
    if not out:
        raise ConfigError(f"no row keeps a token to learn within data.max_length={data['max_length']}; raise it")
    return out


def _encode_row(tokenizer: Any, row: dict[str, Any], fmt: str, data: dict[str, Any]) -> tuple[list[int], list[int]]:
    if fmt == "messages":
        return encode_messages(tokenizer, row[data["messages_field"]], data["max_length"])
    if fmt == "prompt_response":
        return encode_pair(tokenizer, str(row[data["prompt_field"]]), str(row[data["response_field"]]),
                           data["max_length"])
    ids = tokenizer(str(row[data["text_field"]]) + (tokenizer.eos_token or ""),
                    add_special_tokens=True)["input_ids"][: data["max_length"]]
    return ids, list(ids)


class PadCollator:
    """Right-pads ``input_ids``/``labels`` rows into tensors with an attention mask (padding learns nothing)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def split_rows(recipe: Recipe) -> tuple[list[dict], list[dict] | None, str]:
    """(train rows, eval rows or None, format), all checked; nothing is loaded but the data files."""
    data = recipe.data
    train = _read_labelled(data["train"], f"{recipe.source}: data.train")
    fmt = detect_format(train, data, f"{recipe.source}: data.train")
    evaluation = None
    if data["eval"] is not None:
        evaluation = _read_labelled(data["eval"], f"{recipe.source}: data.eval")
        detect_format(evaluation, {**data, "format": fmt}, f"{recipe.source}: data.eval")
    elif data["eval_fraction"]:
        order = list(range(len(train)))
        random.Random(recipe.training.get("seed", 0)).shuffle(order)
        cut = max(1, round(len(train) * data["eval_fraction"]))
        if cut >= len(train):
            raise ConfigError(f"{recipe.source}: data.eval_fraction={data['eval_fraction']} leaves no training rows "
                              f"of {len(train)}")
        evaluation = [train[i] for i in order[:cut]]
        train = [train[i] for i in order[cut:]]
    return train, evaluation, fmt


# ---------------------------------------------------------------------------------------------------------- run


def _callbacks(output: str, stop: dict[str, bool]) -> list[Any]:
    from transformers import TrainerCallback

    class Metrics(TrainerCallback):
        """Appends every log to ``metrics.jsonl`` and shows the latest loss on the progress bar."""

        def __init__(self) -> None:
            self.bar_owner: Any = None

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if not logs or not state.is_world_process_zero:
                return
            record = {"step": state.global_step, "epoch": state.epoch, "time": round(time.time(), 3), **logs}
            with open(os.path.join(output, "metrics.jsonl"), "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            bar = getattr(self.bar_owner, "training_bar", None)
            if bar is not None and "loss" in logs:
                bar.set_postfix(loss=f"{logs['loss']:.4f}")

    class Interrupt(TrainerCallback):
        """After Ctrl-C: save a checkpoint at the end of the current step and stop."""

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if stop["requested"]:
                control.should_save = True
                control.should_training_stop = True
            return control

    return [Metrics(), Interrupt()]


@dataclasses.dataclass
class Prepared:
    """What a run needs before its weights load, all checked."""

    model_dir: str
    tokenizer: Any
    fmt: str
    train_set: list[dict]
    eval_set: list[dict] | None


def prepare(recipe: Recipe, log: Any = print) -> Prepared:
    """Everything that can be checked before the weights load (``graftkit train`` and ``--check`` both run it):
    every row read and rendered through the tokenizer (and chat template), ``data.max_length`` against the model's
    context, and the adapter attached to a copy of the model built on the meta device (targets, ranks, prompt
    sizes), so that a bad value fails in one line in seconds, not after minutes of loading.

    Raises:
        ConfigError / TargetError / UnsupportedError: the first problem, naming the key, file and row.
    """
    from .demo import default_model_dir

    train_rows, eval_rows, fmt = split_rows(recipe)
    model_dir = recipe.model or default_model_dir(log=log)
    config = _model_config(model_dir, recipe)
    tokenizer = _load_tokenizer(model_dir)
    train_set = encode_rows(tokenizer, train_rows, fmt, recipe.data, f"{recipe.source}: data.train")
    eval_set = (encode_rows(tokenizer, eval_rows, fmt, recipe.data, f"{recipe.source}: data.eval")
                if eval_rows else None)
    _attach_on_meta(config, recipe)
    return Prepared(model_dir, tokenizer, fmt, train_set, eval_set)


def _model_config(model_dir: str, recipe: Recipe) -> Any:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as err:
        text = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{recipe.source}: model: cannot read the model's config in {model_dir} ({text})") from None
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and recipe.data["max_length"] > context:
        raise ConfigError(f"{recipe.source}: data.max_length: {recipe.data['max_length']:,d} is longer than the "
                          f"model's context ({context:,d} tokens); use at most {context}")
    return config


def _load_tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, TypeError) as err:
        text = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ConfigError(f"model: cannot read the tokenizer in {model_dir} ({text})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _attach_on_meta(config: Any, recipe: Recipe) -> None:
    """Attach the run's adapter to the model built on the meta device (no memory, no weights read): what
    ``get_peft_model`` would refuse after loading is refused now."""
    import torch
    from transformers import AutoModelForCausalLM

    from . import PeftConfig, get_peft_model

    adapter = PeftConfig.from_dict(recipe.adapter, source=f"{recipe.source}: adapter")
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{recipe.source}: model: not a causal language model transformers can build "
                          f"({str(err).strip()[:200]})") from None
    try:
        get_peft_model(model, adapter)
    except GraftkitError as err:
        raise type(err)(f"{recipe.source}: adapter: {err}") from None
    except (NotImplementedError, RuntimeError):
        pass  # a data-driven start (PiSSA's SVD, ...) cannot run on meta tensors; the real attach checks it


def check_output(output: str, create: bool = True) -> None:
    """The run folder can be what ``graftkit train`` needs: a folder (made if missing, with ``create``) this user
    can write, found before anything loads rather than at the first checkpoint.

    Raises:
        ConfigError: ``output`` is a file, lies under a file, or cannot be created or written.
    """
    if os.path.lexists(output) and not os.path.isdir(output):
        raise ConfigError(f"output: {output} is a file, not a folder; choose a folder for the run")
    parent = output
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"output: {output} lies under {parent}, which is a file; choose a folder for the run")
    if not create:
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"output: {parent} is not writable by this user; choose another folder for the run")
        return
    try:
        os.makedirs(output, exist_ok=True)
        probe, name = tempfile.mkstemp(prefix=".graftkit-probe-", dir=output)
        os.close(probe)
        os.remove(name)
    except OSError as err:
        raise ConfigError(f"output: cannot write in {output} ({err.strerror or err}); choose a folder this user can "
                          "write") from None


def _check_run_folder(output: str, resume: bool, overwrite: bool, log: Any) -> str | None:
    """What ``output`` holds decides what may happen: ``resume`` needs a complete checkpoint (its path is
    returned); otherwise the folder must be new or empty unless ``overwrite``."""
    from .integrations.trainer import checkpoints_of, newest_complete_checkpoint

    done = checkpoints_of(output)
    if resume:
        if not done:
            raise ConfigError(f"--resume: no checkpoint-N folder in {output}; start the run without --resume")
        return newest_complete_checkpoint(output, log=lambda message: log(f"graftkit train: {message}"))
    entries = sorted(os.listdir(output)) if os.path.isdir(output) else []
    if entries and not overwrite:
        if done:
            raise ConfigError(f"{output} holds a run ({os.path.basename(done[-1])}); pass --resume to continue it or "
                              "--overwrite to start again (its checkpoints are deleted)")
        raise ConfigError(f"{output} is not empty (it holds {', '.join(entries[:5])}"
                          f"{', ...' if len(entries) > 5 else ''}); graftkit train writes a run into a new or empty "
                          "folder. Choose another output, or pass --overwrite to write the run over it (adapter "
                          "files, README.md and run.yaml there are replaced)")
    return None


def run(recipe: Recipe, resume: bool = False, overwrite: bool = False, merge: bool = False,
        log: Any = print) -> dict[str, Any]:
    """Train as ``recipe`` says; returns the final metrics.

    Raises:
        ConfigError: the data do not fit the recipe, ``resume`` without a complete checkpoint, an output folder
            that cannot be written, or one that is not empty (without ``resume`` or ``overwrite``).
    """
    import shutil

    from . import PeftConfig, Trainer, get_peft_model
    from .integrations.trainer import STAGING_DIR, checkpoints_of

    output = recipe.output
    check_output(output, create=False)
    checkpoint = _check_run_folder(output, resume, overwrite, log)
    ready = prepare(recipe, log)
    check_output(output)
    if checkpoint is not None:  # logs past the checkpoint (a crash after it) are logged again by the resumed run
        log(f"graftkit train: resuming from {os.path.basename(checkpoint)}")
        _truncate_metrics(os.path.join(output, "metrics.jsonl"), int(checkpoint.rsplit("-", 1)[1]))
    if overwrite and not resume:
        for path in checkpoints_of(output) + [os.path.join(output, STAGING_DIR)]:
            shutil.rmtree(path, ignore_errors=True)
        for name in ("metrics.jsonl", "loss.png"):
            if os.path.exists(os.path.join(output, name)):
                os.remove(os.path.join(output, name))

    import torch
    from transformers import AutoModelForCausalLM, TrainingArguments

    model_dir, tokenizer, fmt = ready.model_dir, ready.tokenizer, ready.fmt
    train_set, eval_set = ready.train_set, ready.eval_set
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if recipe.quantization:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(**recipe.quantization)
    base = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if recipe.quantization:
        from .integrations import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    from transformers import set_seed

    set_seed(recipe.training.get("seed", 0))  # the adapter's random start is part of the run
    model = get_peft_model(base, PeftConfig.from_dict(recipe.adapter, source=f"{recipe.source}: adapter"))
    trainable, total = model.get_nb_trainable_parameters()
    log(f"graftkit train: {recipe.adapter['peft_type']} on {model_dir}: {trainable:,d} trainable of {total:,d} "
        f"parameters; {len(train_set)} training rows ({fmt})" + (f", {len(eval_set)} eval rows" if eval_set else ""))
    args = TrainingArguments(output_dir=output, **recipe.training)
    stop = {"requested": False}
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                      data_collator=PadCollator(tokenizer.pad_token_id), processing_class=tokenizer)
    for callback in _callbacks(output, stop):
        trainer.add_callback(callback)
    metrics_cb = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "Metrics")
    metrics_cb.bar_owner = next((c for c in trainer.callback_handler.callbacks
                                 if type(c).__name__ == "ProgressCallback"), None)

    def interrupted(_signum: int, _frame: Any) -> None:
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        log("\ngraftkit train: stopping after this step and saving a checkpoint (Ctrl-C again to quit at once)")

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        signal.signal(signal.SIGINT, previous)
    if stop["requested"]:
        last = [os.path.basename(c) for c in checkpoints_of(output)]
        log(f"graftkit train: interrupted at step {trainer.state.global_step}; {last[-1] if last else 'no checkpoint'} "
            f"saved in {output}. Continue with: graftkit train --config {recipe.source} --resume")
        return {"interrupted": True, "step": trainer.state.global_step}
    final: dict[str, Any] = {"step": trainer.state.global_step}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if losses:
        final["train_loss"] = losses[-1]
    if eval_set:
        evaluation = trainer.evaluate()
        final["eval_loss"] = evaluation["eval_loss"]
        final["eval_perplexity"] = math.exp(min(evaluation["eval_loss"], 50.0))
    trainer.save_model(output)
    with open(os.path.join(output, "run.yaml"), "w", encoding="utf-8") as handle:
        from .recipe import dump

        handle.write(dump(recipe))
    plot_losses(trainer.state.log_history, os.path.join(output, "loss.png"), log)
    write_card(output, recipe, model_dir, fmt, len(train_set), final, trainable)
    if merge:
        merged = model.merge_and_unload(safe_merge=True)
        merged.save_pretrained(os.path.join(output, "merged"))
        tokenizer.save_pretrained(os.path.join(output, "merged"))
        log(f"graftkit train: merged model saved to {os.path.join(output, 'merged')}")
    log("graftkit train: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in final.items()) + f"; adapter in {output}")
    return final


def _truncate_metrics(path: str, step: int) -> None:
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as handle:
        kept = [line for line in handle if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path + ".partial", "w", encoding="utf-8") as handle:
        handle.writelines(kept)
    os.replace(path + ".partial", path)


def plot_losses(history: list[dict[str, Any]], path: str, log: Any = print) -> bool:
    """Train (and eval) loss against steps as a PNG; ``False`` (with a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("graftkit train: loss.png skipped (pip install 'graftkit[train]' for matplotlib)")
        return False
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evaluation = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evaluation:
        ax.plot(*zip(*evaluation, strict=True), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if train or evaluation:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_card(output: str, recipe: Recipe, model_dir: str, fmt: str, rows: int, final: dict[str, Any],
               trainable: int) -> None:
    """``README.md``: what was trained on what, how far, with which result, and how to load it."""
    adapter = {k: v for k, v in recipe.adapter.items() if k != "peft_type"}
    data = ", ".join(os.path.basename(p) for p in recipe.data["train"])
    metrics = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in final.items())
    text = f"""---
library_name: peft
base_model: {model_dir}
tags:
- graftkit
- {str(recipe.adapter['peft_type']).lower()}
---

# Adapter trained with graftkit

- Base model: `{model_dir}`
- Method: {recipe.adapter['peft_type']} ({json.dumps(adapter, default=str)}), {trainable:,d} trainable parameters
- Data: {data} ({rows} rows, {fmt} format)
- Steps: {final.get('step')}

| metric | value |
|---|---|
{metrics}

Load it with graftkit or HF peft:

```python
from transformers import AutoModelForCausalLM
import graftkit

model = graftkit.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{model_dir}"), "{output}")
```

`run.yaml` holds the whole run (defaults included), `metrics.jsonl` every log, `loss.png` the loss curve.
"""
    with open(os.path.join(output, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(text)
