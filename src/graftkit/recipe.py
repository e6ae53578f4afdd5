"""``graftkit train --config run.yaml``: one file for a whole training run, checked before any weight loads.

::

    model: path/to/model            # a local folder; "default" (or no key): the embedded SmolLM2-135M-Instruct
    output: runs/pirate             # the run's folder (checkpoints, adapter, metrics, plot, card)
    data:
      train: data/train.jsonl       # JSONL / CSV / Parquet / .txt files, or a datasets.save_to_disk folder
      eval: data/eval.jsonl         # or eval_fraction: 0.1 (a seeded split of train)
      format: auto                  # prompt_response | messages | text | auto (from the first row's keys)
      max_length: 512
    adapter:                        # a peft_type and that config class's own fields: any registered method
      peft_type: LORA
      r: 16
      target_modules: all-linear
    quantization:                   # optional: BitsAndBytesConfig names (needs bitsandbytes)
      load_in_4bit: true
    training:                       # transformers TrainingArguments names
      max_steps: 100
      learning_rate: 2.0e-4

Every key is checked against what it may be (unknown keys with a "did you mean", wrong types, missing files) and
each problem is one :class:`~graftkit.errors.ConfigError` line naming the key, before the model is read.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import json
import os
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, MissingPackageError

FORMATS = ("auto", "prompt_response", "messages", "text")
MAX_LENGTH = 1 << 20  # tokens per row; the model's own context is checked against it before any weight loads
_TOP = ("model", "output", "data", "adapter", "quantization", "training")
_DATA = {"train": None, "eval": None, "eval_fraction": None, "format": "auto", "max_length": 512,
         "prompt_field": "prompt", "response_field": "response", "messages_field": "messages", "text_field": "text"}
# TrainingArguments defaults a run changes (the user's file may set them otherwise).
_TRAINING_DEFAULTS = {"max_steps": 100, "per_device_train_batch_size": 8, "learning_rate": 2e-4,
                      "lr_scheduler_type": "cosine", "warmup_steps": 0.1, "logging_steps": 5, "save_steps": 50,
                      "save_total_limit": 2, "report_to": "none", "remove_unused_columns": False, "seed": 0}
# Set by the run itself: naming them in the file is refused.
_TRAINING_OWNED = {"output_dir": "use the top-level 'output' key",
                   "resume_from_checkpoint": "continue a run with graftkit train --resume",
                   "overwrite_output_dir": "pass --overwrite to graftkit train"}


@dataclass
class Recipe:
    """A checked run file: everything ``graftkit train`` needs, with defaults filled in."""

    source: str
    model: str | None
    output: str
    data: dict[str, Any]
    adapter: dict[str, Any]
    quantization: dict[str, Any] | None
    training: dict[str, Any]

    def resolved(self) -> dict[str, Any]:
        """The run as it will happen (defaults included), for ``run.yaml`` in the output folder."""
        out = {"model": self.model or "default", "output": self.output, "data": self.data, "adapter": self.adapter,
               "training": self.training}
        if self.quantization:
            out["quantization"] = self.quantization
        return copy.deepcopy(out)


def _unknown(where: str, key: object, allowed: list[str]) -> ConfigError:
    hint = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
    did = f" (did you mean '{hint[0]}'?)" if hint else ""
    return ConfigError(f"{where}: unknown key '{key}'{did}; allowed: {', '.join(sorted(allowed))}")


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(value).__name__} {value!r:.60}")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{where}: key {bad[0]!r} is not a string")
    return value


def set_key(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``--set section.key=value`` override (the value parsed as YAML: numbers, booleans, lists)."""
    import yaml

    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. training.max_steps=20")
    path, text = assignment.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set {assignment!r}: the key {path!r} has an empty part")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML ({err})") from None
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: '{key}' holds {child!r}, not a mapping")
        node = child
    node[keys[-1]] = value


MAX_FILE_BYTES = 10_000_000  # a run file is a page of YAML; anything this size is a mistake
MAX_VALUES = 100_000  # values in a run file once YAML aliases are expanded (an alias "bomb" expands to billions)


def read_text(path: str, what: str, limit: int | None = None) -> str:
    """The UTF-8 text of a regular file (a FIFO would block the reader; a device could be endless).

    Raises:
        ConfigError: not a regular file, larger than ``limit`` bytes, or not UTF-8 (the message names the file).
    """
    from .config import check_regular_file

    check_regular_file(path, what, ConfigError)
    if limit is not None and os.path.getsize(path) > limit:
        raise ConfigError(f"{path}: {what} is {os.path.getsize(path):,d} bytes, more than {limit:,d}; is it the "
                          "right file?")
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: {what} is not UTF-8 text (byte 0x{data[err.start]:02x}); save it as "
                          "UTF-8") from None


def _check_size(value: Any, where: str) -> None:
    """Refuse a loaded YAML document that expands to more than :data:`MAX_VALUES` values (aliases count each
    time they are used), before anything walks it in full."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise ConfigError(f"{where}: the file expands to more than {MAX_VALUES:,d} values (YAML aliases used "
                              "over and over?); write the values out")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        import yaml
    except ImportError as err:
        raise MissingPackageError("reading a run file needs PyYAML: pip install 'graftkit[train]'") from err
    path = os.fspath(path)
    if not os.path.lexists(path):
        raise ConfigError(f"--config {path}: no such file")
    text = read_text(path, "the run file", MAX_FILE_BYTES)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a run file") from None
    _check_size(raw, path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top, got {type(raw).__name__}")
    return raw


def check(raw: dict[str, Any], source: str, base_dir: str = ".") -> Recipe:
    """Validate a run file's contents (nothing is loaded); relative paths are taken from ``base_dir``.

    Raises:
        ConfigError: the first problem found, naming its key.
        UnsupportedError: the adapter turns on a feature graftkit does not implement.
    """
    raw = copy.deepcopy(raw)
    for key in raw:
        if key not in _TOP:
            raise _unknown(source, key, list(_TOP))

    def local(value: Any, where: str, folder_ok: bool = True) -> str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{source}: {where}: expected a path (a string), got {value!r:.60}")
        path = value if os.path.isabs(value) else os.path.normpath(os.path.join(base_dir, value))
        if not os.path.exists(path) or (not folder_ok and os.path.isdir(path)):
            raise ConfigError(f"{source}: {where}: {value!r} does not exist" + (
                f" (looked at {path})" if path != value else ""))
        return path

    model = raw.get("model")
    if model in (None, "default"):
        model = None
    else:
        model = local(model, "model")
        if not os.path.isdir(model):
            raise ConfigError(f"{source}: model: {raw['model']!r} is not a folder (a local model saved with "
                              "save_pretrained, or 'default')")
    output = raw.get("output")
    if not isinstance(output, str) or not output:
        raise ConfigError(f"{source}: output: expected the run's folder (a string), got {output!r:.60}; set it in the "
                          "file or pass --output")
    output = output if os.path.isabs(output) else os.path.normpath(os.path.join(base_dir, output))

    data = _mapping(raw.get("data"), f"{source}: data")
    for key in data:
        if key not in _DATA:
            raise _unknown(f"{source}: data", key, list(_DATA))
    data = {**_DATA, **data}
    if data["train"] is None:
        raise ConfigError(f"{source}: data.train: missing; give the training data (a file, a list of files or a "
                          "datasets.save_to_disk folder)")
    for split in ("train", "eval"):
        value = data[split]
        if value is None:
            continue
        paths = value if isinstance(value, list) else [value]
        if not paths:
            raise ConfigError(f"{source}: data.{split}: an empty list")
        data[split] = [local(p, f"data.{split}") for p in paths]
    if data["format"] not in FORMATS:
        raise ConfigError(f"{source}: data.format: expected one of {', '.join(FORMATS)}, got {data['format']!r}")
    fraction = data["eval_fraction"]
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise ConfigError(f"{source}: data.eval_fraction: expected a number between 0 and 1, got {fraction!r}")
        if data["eval"] is not None:
            raise ConfigError(f"{source}: data: give eval or eval_fraction, not both")
    if (isinstance(data["max_length"], bool) or not isinstance(data["max_length"], int)
            or not 8 <= data["max_length"] <= MAX_LENGTH):
        raise ConfigError(f"{source}: data.max_length: expected an integer from 8 to {MAX_LENGTH:,d} (and at most the "
                          f"model's context), got {data['max_length']!r:.40}")
    for key in ("prompt_field", "response_field", "messages_field", "text_field"):
        if not isinstance(data[key], str) or not data[key]:
            raise ConfigError(f"{source}: data.{key}: expected a column name, got {data[key]!r}")

    adapter = _check_adapter(_mapping(raw.get("adapter"), f"{source}: adapter"), source)
    quantization = _check_quantization(raw.get("quantization"), source)
    training = _check_training(_mapping(raw.get("training"), f"{source}: training"), source, output)
    if training.get("eval_strategy", "no") != "no" and data["eval"] is None and not data["eval_fraction"]:
        raise ConfigError(f"{source}: training.eval_strategy={training['eval_strategy']!r} needs eval data "
                          "(data.eval or data.eval_fraction)")
    return Recipe(source, model, output, data, adapter, quantization, training)


def _check_adapter(adapter: dict[str, Any], source: str) -> dict[str, Any]:
    from .config import PeftConfig
    from .registry import config_class

    adapter = {"peft_type": "LORA", "task_type": "CAUSAL_LM", **adapter}
    target = config_class(str(adapter["peft_type"]), source=f"{source}: adapter.peft_type")
    names = [f.name for f in dataclasses.fields(target) if f.init]
    for key in adapter:
        if key not in names:
            raise _unknown(f"{source}: adapter ({target.__name__})", key, names)
    PeftConfig.from_dict(adapter, source=f"{source}: adapter")  # the config class's own checks
    return adapter


def _check_quantization(value: Any, source: str) -> dict[str, Any] | None:
    if value is None:
        return None
    quantization = _mapping(value, f"{source}: quantization")
    from transformers import BitsAndBytesConfig

    names = [n for n in inspect.signature(BitsAndBytesConfig.__init__).parameters if n not in ("self", "kwargs")]
    for key in quantization:
        if key not in names:
            raise _unknown(f"{source}: quantization", key, names)
    if not (quantization.get("load_in_4bit") or quantization.get("load_in_8bit")):
        raise ConfigError(f"{source}: quantization: set load_in_4bit: true or load_in_8bit: true")
    try:
        BitsAndBytesConfig(**quantization)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: quantization: {err}") from None
    return quantization


# Ranges of the TrainingArguments a run commonly sets: (what the value must be, the test). A value outside is an
# error naming the key, never a silent fallback (max_steps: -5 would train num_train_epochs epochs).
_TRAINING_RANGES: dict[str, tuple[str, Any]] = {
    "max_steps": ("a positive integer (or -1: train num_train_epochs epochs)", lambda v: v > 0 or v == -1),
    "num_train_epochs": ("a number > 0", lambda v: v > 0),
    "learning_rate": ("a number > 0", lambda v: v > 0),
    "per_device_train_batch_size": ("an integer >= 1", lambda v: v >= 1),
    "per_device_eval_batch_size": ("an integer >= 1", lambda v: v >= 1),
    "gradient_accumulation_steps": ("an integer >= 1", lambda v: v >= 1),
    "eval_accumulation_steps": ("an integer >= 1", lambda v: v >= 1),
    "logging_steps": ("a number > 0 (a fraction of the run below 1)", lambda v: v > 0),
    "save_steps": ("a number > 0 (a fraction of the run below 1)", lambda v: v > 0),
    "eval_steps": ("a number > 0 (a fraction of the run below 1)", lambda v: v > 0),
    "warmup_steps": ("a number >= 0 (a fraction of the run below 1)", lambda v: v >= 0),
    "warmup_ratio": ("a number from 0 to 1", lambda v: 0 <= v <= 1),
    "weight_decay": ("a number >= 0", lambda v: v >= 0),
    "max_grad_norm": ("a number >= 0", lambda v: v >= 0),
    "adam_beta1": ("a number from 0 to below 1", lambda v: 0 <= v < 1),
    "adam_beta2": ("a number from 0 to below 1", lambda v: 0 <= v < 1),
    "adam_epsilon": ("a number > 0", lambda v: v > 0),
    "label_smoothing_factor": ("a number from 0 to below 1", lambda v: 0 <= v < 1),
    "save_total_limit": ("an integer >= 1", lambda v: v >= 1),
    "seed": ("an integer >= 0", lambda v: v >= 0),
    "data_seed": ("an integer >= 0", lambda v: v >= 0),
    "dataloader_num_workers": ("an integer >= 0", lambda v: v >= 0),
    "neftune_noise_alpha": ("a number > 0", lambda v: v > 0),
    "torch_empty_cache_steps": ("an integer >= 1", lambda v: v >= 1),
}


def _describe(hint: Any) -> str:
    text = str(hint).replace("typing.", "").replace("NoneType", "None")
    return text.replace("<class '", "").replace("'>", "")


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (read from YAML) is of the annotated type ``hint`` (unions, Optional, Literal, list[...],
    dict[...], enums by value); types it does not know are accepted (TrainingArguments checks them itself)."""
    import enum
    import math
    import types
    import typing

    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if hint is type(None) or hint is None:
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if hint is list or origin is list:
        args = typing.get_args(hint)
        return isinstance(value, list) and (not args or all(_fits(v, args[0]) for v in value))
    if hint is dict or origin is dict:
        args = typing.get_args(hint)
        return isinstance(value, dict) and all(isinstance(k, str) for k in value) and (
            len(args) < 2 or all(_fits(v, args[1]) for v in value.values()))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return value in [m.value for m in hint] or isinstance(value, hint)
    if isinstance(hint, type) and hint.__module__ != "builtins":
        return isinstance(value, hint)  # an object a YAML file cannot hold (ParallelismConfig)
    return True


def _check_training(training: dict[str, Any], source: str, output: str) -> dict[str, Any]:
    import typing

    from transformers import TrainingArguments

    fields = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}
    try:
        hints = typing.get_type_hints(TrainingArguments)
    except Exception:  # noqa: BLE001 - an annotation this transformers cannot resolve: check by defaults only
        hints = {}
    for key in training:
        if key in _TRAINING_OWNED:
            raise ConfigError(f"{source}: training.{key}: set by the run; {_TRAINING_OWNED[key]}")
        if key not in fields:
            raise _unknown(f"{source}: training", key, [k for k in fields if not k.startswith("_")])
        default = fields[key].default
        value = training[key]
        if isinstance(value, bool) and isinstance(default, str):  # YAML reads a bare no / off as false
            value = training[key] = "no" if value is False else "yes"
        hint = hints.get(key)
        if hint is None:
            hint = (bool if isinstance(default, bool) else int if isinstance(default, int) else
                    float if isinstance(default, float) else Any)
        if not _fits(value, hint):
            expected = {bool: "true or false", int: "an integer", float: "a number"}.get(hint, _describe(hint))
            if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                expected = "a finite number"
            raise ConfigError(f"{source}: training.{key}: expected {expected}, got {value!r:.60}")
        if key in _TRAINING_RANGES and value is not None and not isinstance(value, str):
            what, test = _TRAINING_RANGES[key]
            if not test(value):
                raise ConfigError(f"{source}: training.{key}: expected {what}, got {value!r:.60}")
    _check_report_to(training.get("report_to"), source)
    if training.get("deepspeed") is not None:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise MissingPackageError(f"{source}: training.deepspeed needs the deepspeed package: pip install "
                                      "deepspeed (or remove the key)")
    if "num_train_epochs" in training and "max_steps" not in training:
        training = {**training, "max_steps": -1}  # epochs asked for: no step limit
    resolved = {**_TRAINING_DEFAULTS, **training}
    if resolved.get("eval_strategy", "no") != "no" and "eval_steps" not in resolved:
        resolved["eval_steps"] = resolved["save_steps"]
    try:
        TrainingArguments(output_dir=output, **resolved)
    except Exception as err:  # noqa: BLE001 - TrainingArguments raises many types for a bad combination
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{source}: training: {text}") from None
    return resolved


def _check_report_to(value: Any, source: str) -> None:
    """``report_to`` names only trackers that are installed (transformers would fail at the first log)."""
    if value is None:
        return
    from transformers.integrations import get_available_reporting_integrations

    names = [value] if isinstance(value, str) else list(value)
    available = get_available_reporting_integrations()
    missing = [n for n in names if n not in ("none", "all") and n not in available]
    if missing:
        raise ConfigError(f"{source}: training.report_to: {', '.join(map(str, missing))} is not installed (available: "
                          f"{', '.join(available) or 'none'}); install it or use report_to: none")


def dump(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(recipe.resolved(), default=str)), sort_keys=False)
