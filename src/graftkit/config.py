"""Adapter configs: the base dataclass, the ecosystem's enums, and ``adapter_config.json`` read/write.

The on-disk keys are a fact of the ecosystem: HF peft, vLLM and other readers expect the same
``adapter_config.json``. A method's config is a dataclass whose fields are the keys it understands;
keys that belong to features graftkit does not implement are listed in ``peft_only_fields`` with their
inert default, so that a saved file carries the full key set and a loaded file that *uses* one of those
features fails loudly instead of silently training something else.

Every field is checked against its annotation when a config is built (in code or from a file): numbers are
finite numbers, booleans are real booleans, lists hold what they should, regexes compile. A key in a file that
is close to a known field name (``lora_alpah``) is an error naming the field it probably meant; other unknown
keys (written by a newer version of either library) are dropped with a warning naming them.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import json
import math
import os
import re
import stat
import types
import typing
import warnings
from typing import Any, ClassVar, Union

from .errors import ConfigError, UnknownFieldError, UnsupportedError

CONFIG_NAME = "adapter_config.json"
ALL_LINEAR = "all-linear"  # target_modules value: every linear layer but the output layer
# The peft release whose file format graftkit writes; readers use it to pick their parsing rules.
FORMAT_PEFT_VERSION = "0.21.2"


class PeftType(str, enum.Enum):
    """The ``peft_type`` value of an adapter config (the ecosystem's names)."""

    LORA = "LORA"
    IA3 = "IA3"
    ADALORA = "ADALORA"
    PROMPT_TUNING = "PROMPT_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    P_TUNING = "P_TUNING"
    ADAPTION_PROMPT = "ADAPTION_PROMPT"
    TRAINABLE_TOKENS = "TRAINABLE_TOKENS"

    def __str__(self) -> str:
        return self.value


class TaskType(str, enum.Enum):
    """The ``task_type`` value of an adapter config: picks the task class of :class:`PeftModel`."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _describe(value: Any) -> str:
    text = repr(value)
    return (text[:80] + "...") if len(text) > 80 else f"{text} ({type(value).__name__})"


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against the annotation ``hint``, with the harmless conversions a JSON file needs
    (``8.0`` for an int field, a tuple or set for a list). Returns the value to store.

    Raises:
        ConfigError: the value does not fit; the message names ``where``, the value and the expected type.
    """
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, where)
            except ConfigError as exc:
                errors.append(exc)
        deeper = [e for e in errors if not str(e).startswith(f"{where} must")]
        if deeper:  # the value has the right shape but an item does not fit: name the item
            raise deeper[0]
        expected = " or ".join(_type_name(o) for o in options)
        raise ConfigError(f"{where} must be {expected}, got {_describe(value)}")
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer, got {_describe(value)}")
        return value
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return value
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if isinstance(value, hint):
            return value
        raise ConfigError(f"{where} must be one of {[m.value for m in hint]}, got {_describe(value)}")
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {_describe(value)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple, set, frozenset)):
            raise ConfigError(f"{where} must be a list, got {_describe(value)}")
        (item,) = typing.get_args(hint)
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else list(value)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(items)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {_describe(value)}")
        key_hint, value_hint = typing.get_args(hint)
        return {_check_type(k, key_hint, f"{where} key"): _check_type(v, value_hint, f"{where}[{k!r}]")
                for k, v in value.items()}
    return value


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin is list:
        item = typing.get_args(hint)[0]
        return "a list of " + {str: "strings", int: "integers", float: "numbers"}.get(item, _type_name(item))
    if origin is dict:
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def check_regex(pattern: str, where: str) -> None:
    """Raise a :class:`ConfigError` naming ``where`` if ``pattern`` is not a valid regex."""
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ConfigError(f"{where}={pattern!r} is not a valid regular expression ({exc})") from None


def check_regular_file(path: str, what: str, error: type[Exception]) -> None:
    """Raise ``error`` unless ``path`` is a regular file this user can read (a FIFO would block a reader)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        kind = "a dangling symbolic link" if os.path.islink(path) else "missing"
        raise error(f"{path}: {what} is {kind}; point to the folder that save_pretrained wrote") from None
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a FIFO, socket or device)"
        raise error(f"{path}: {what} is {kind}; it must be a regular file written by save_pretrained")
    if not os.access(path, os.R_OK):
        raise error(f"{path}: {what} is not readable by this user; check the file's permissions")


def read_regular_file(path: str, what: str, error: type[Exception]) -> bytes:
    """The bytes of ``path`` after :func:`check_regular_file`."""
    check_regular_file(path, what, error)
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror or exc})") from None


@dataclasses.dataclass
class PeftConfig:
    """Fields every adapter config has.

    Args:
        peft_type: the method (``"LORA"``, ...); set by each method's config class.
        task_type: a :class:`TaskType`; picks the task class on load (``None``: plain :class:`PeftModel`).
        inference_mode: load frozen (no adapter parameter requires grad).
        base_model_name_or_path: where the base model comes from (a local folder or a Hub id);
            filled from the model on :func:`get_peft_model` when left ``None``.
        revision: revision of the base model.
    """

    peft_type: str | PeftType | None = None
    task_type: str | TaskType | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    auto_mapping: dict[str, str] | None = None
    peft_version: str | None = None

    # Fields that say nothing about what an adapter computes (a user may edit them in a saved file).
    bookkeeping_fields: ClassVar[frozenset[str]] = frozenset(
        {"inference_mode", "base_model_name_or_path", "revision", "auto_mapping", "task_type", "peft_version"})
    # Keys of features that only HF peft implements, with the inert value that means "not used".
    peft_only_fields: ClassVar[dict[str, Any]] = {}
    # Fields that training itself changes (AdaLoRA's rank_pattern): loading a checkpoint into an existing adapter
    # takes them from the file instead of requiring them equal.
    training_state_fields: ClassVar[frozenset[str]] = frozenset()
    # graftkit fields that the ecosystem's config class of this method lacks: written only when set.
    graftkit_only_fields: ClassVar[frozenset[str]] = frozenset()

    def __new__(cls, *args: Any, **kwargs: Any) -> PeftConfig:
        # Runs before the dataclass __init__: an unknown keyword gets a ConfigError naming the likely field
        # (also a TypeError, which Python raises for unknown keywords).
        names = {f.name for f in dataclasses.fields(cls)}
        for key in kwargs:
            if key not in names:
                likely = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.75)
                hint = ("it is an option of HF peft that graftkit does not implement" if key in cls.peft_only_fields
                        else f"did you mean '{likely[0]}'?" if likely else f"the fields are {sorted(names)}")
                raise UnknownFieldError(f"{cls.__name__} has no field '{key}'; {hint}")
        return super().__new__(cls)

    def __post_init__(self) -> None:
        if self.task_type is not None:
            try:
                self.task_type = TaskType(str(self.task_type) if isinstance(self.task_type, str) else None)
            except ValueError:
                raise ConfigError(
                    f"task_type={self.task_type!r} is not a task type; expected one of "
                    f"{[t.value for t in TaskType]} or None"
                ) from None
        self._check_fields()

    def _check_fields(self) -> None:
        """Check every field against its annotation (see :func:`_check_type`); store the normalised value."""
        hints = _hints(type(self))
        for field in dataclasses.fields(self):
            where = f"{type(self).__name__}.{field.name}"
            setattr(self, field.name, _check_type(getattr(self, field.name), hints[field.name], where))

    # ------------------------------------------------------------------ dict / JSON
    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict that ``adapter_config.json`` holds (peft's key set)."""
        out = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)
               if f.name not in self.graftkit_only_fields or getattr(self, f.name) is not None}
        for key, default in self.peft_only_fields.items():
            out.setdefault(key, copy.deepcopy(default))
        if out.get("peft_version") is None:
            out["peft_version"] = FORMAT_PEFT_VERSION
        return out

    def semantic_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without the bookkeeping fields: what decides the adapter's computation."""
        return {k: v for k, v in self.to_dict().items() if k not in self.bookkeeping_fields}

    def copy(self) -> PeftConfig:
        return copy.deepcopy(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> PeftConfig:
        """Build the config class that ``data["peft_type"]`` names.

        Raises:
            ConfigError: no or unknown ``peft_type``, or a field value the config rejects.
            UnsupportedError: the dict turns on a feature graftkit does not implement.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        target = cls
        if cls is PeftConfig or "peft_type" in data:
            from .registry import config_class  # the registry imports this module

            peft_type = data.get("peft_type")
            if peft_type is None:
                raise ConfigError(f"{source}: no 'peft_type' key; is this an adapter_config.json?")
            if not isinstance(peft_type, str):
                raise ConfigError(f"{source}: peft_type must be a string, got {_describe(peft_type)}")
            target = config_class(peft_type, source=source)
            if cls is not PeftConfig and not issubclass(target, cls):
                raise ConfigError(f"{source}: peft_type={peft_type!r} is not a {cls.__name__}")
        names = {f.name for f in dataclasses.fields(target)}
        kwargs = {k: v for k, v in data.items() if k in names}
        for key, inert in target.peft_only_fields.items():
            if key in data and data[key] != inert and not (data[key] is None or data[key] is False
                                                           or data[key] == {} or data[key] == []):
                raise UnsupportedError(
                    f"{source}: '{key}'={data[key]!r} turns on a feature graftkit does not implement; "
                    f"use an adapter without it (graftkit reads '{key}'={inert!r})"
                )
        known = names | set(target.peft_only_fields)
        unknown = sorted(set(data) - known, key=str)
        for key in unknown:
            if not isinstance(key, str):
                raise ConfigError(f"{source}: key {key!r} is not a string")
            likely = [k for k in difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8) if k not in data]
            if likely:
                raise ConfigError(
                    f"{source}: unknown key '{key}'; did you mean '{likely[0]}'? A misspelled key would silently "
                    f"fall back to the default of '{likely[0]}': fix the key's name"
                )
        if unknown:
            warnings.warn(
                f"{source}: ignoring keys graftkit does not know (written by a newer version?): {unknown}",
                stacklevel=3,
            )
        kwargs.pop("peft_type", None)
        try:
            return target(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except UnsupportedError as exc:
            raise UnsupportedError(f"{source}: {exc}") from None
        except (TypeError, ValueError, AttributeError, re.error) as exc:  # a check written without ConfigError
            raise ConfigError(f"{source}: invalid value: {exc}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> PeftConfig:
        """Read an ``adapter_config.json``.

        Raises:
            ConfigError: the file is missing, not a regular file, not UTF-8 JSON, or holds an invalid config.
        """
        path = os.fspath(path)
        raw = read_regular_file(path, CONFIG_NAME, ConfigError)
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-save the adapter") \
                from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc}); re-save the adapter or fix the file") from None
        except RecursionError:
            raise ConfigError(f"{path}: JSON nested too deeply to be an adapter config; re-save the adapter") from None
        return cls.from_dict(data, source=path)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        subfolder: str | None = None,
        revision: str | None = None,
        **hub_kwargs: Any,
    ) -> PeftConfig:
        """Read the config of an adapter folder (local, or a Hub id found in the local HF cache)."""
        from .io import checkpoint_paths, resolve_adapter_file

        path = resolve_adapter_file(
            pretrained_model_name_or_path, CONFIG_NAME, subfolder=subfolder, revision=revision, **hub_kwargs
        )
        return cls.from_json_file(checkpoint_paths(os.path.dirname(path))[CONFIG_NAME])  # after an interrupted save

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` (as one unit, like an adapter save)."""
        from .io import save_checkpoint, text_writer

        save_checkpoint(os.fspath(save_directory), {CONFIG_NAME: text_writer(self.to_json_string())})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


@dataclasses.dataclass
class TunerConfig(PeftConfig):
    """Fields shared by methods that wrap layers picked by name (LoRA, IA3, ...).

    Args:
        target_modules: module names (a name matches itself and any module path ending in ``.name``),
            one regex string matched against the full module path, or ``"all-linear"``.
            ``None`` picks the method's default for the model's architecture.
        exclude_modules: names or a regex of modules never to adapt, with the same matching rules.
        layers_to_transform: only adapt modules of these layer indices.
        layers_pattern: the name of the layer list (``"layers"``, ``"h"``...) used to read layer indices.
        modules_to_save: modules (by name) trained in full and saved with the adapter, such as a classifier head.
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.modules_to_save, str):  # one name, not a list of its letters
            self.modules_to_save = [self.modules_to_save]
        super().__post_init__()
        for field in ("target_modules", "exclude_modules"):
            value = getattr(self, field)
            if isinstance(value, str) and value != ALL_LINEAR:
                check_regex(value, f"{type(self).__name__}.{field}")
            elif isinstance(value, list) and any(not name for name in value):
                raise ConfigError(f"{type(self).__name__}.{field} holds an empty name: {value!r}")
        patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else (self.layers_pattern or [])
        for pattern in patterns:
            check_regex(pattern, f"{type(self).__name__}.layers_pattern")
        layers = [self.layers_to_transform] if isinstance(self.layers_to_transform, int) else self.layers_to_transform
        if layers is not None and any(i < 0 for i in layers):
            raise ConfigError(f"{type(self).__name__}.layers_to_transform holds a negative layer index: {layers!r}")
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR \
                and self.layers_to_transform is not None:
            raise ConfigError(
                "layers_to_transform cannot be combined with a regex target_modules; "
                "put the layer indices into the regex, or pass target_modules as a list"
            )
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ConfigError("layers_pattern is only used with layers_to_transform; set both, or neither")


@dataclasses.dataclass
class PromptLearningConfig(PeftConfig):
    """Fields shared by methods that add virtual tokens instead of wrapping layers (prompt, prefix, p-tuning).

    Args:
        num_virtual_tokens: how many virtual tokens the adapter adds (> 0; required when the adapter is added).
        token_dim: the model's hidden size; read from the model when ``None``.
        num_transformer_submodules: 1 for decoder-only and encoder-only models, 2 when an encoder-decoder model
            gets virtual tokens on both sides; filled in when the adapter is added.
        num_attention_heads / num_layers: the model's, read from its config when ``None``.
        modules_to_save: modules (by name) trained in full and saved with the adapter, such as a classifier head.
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        super().__post_init__()
        name = type(self).__name__  # num_virtual_tokens may stay None until the config is used (fill_from_model)
        for field in ("num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                      "num_layers"):
            value = getattr(self, field)
            if value is not None and value <= 0:
                raise ConfigError(f"{name}.{field} must be a positive integer, got {value!r}")

    def fill_from_model(self, model: Any) -> None:
        """Read ``token_dim``, ``num_layers`` and ``num_attention_heads`` from the model's config where unset.

        Raises:
            ConfigError: the model's config does not say (the message names the field to set).
        """
        if self.num_virtual_tokens is None:
            raise ConfigError(f"{type(self).__name__}.num_virtual_tokens is required to add the adapter: how many "
                              "virtual tokens to train (e.g. 20)")
        model_config = getattr(model, "config", None)
        text = getattr(model_config, "text_config", None) or model_config  # multimodal models: the language model
        sources = {"token_dim": ("hidden_size", "n_embd", "d_model"),
                   "num_layers": ("num_hidden_layers", "num_layers", "n_layer"),
                   "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")}
        for field, keys in sources.items():
            if getattr(self, field) is None:
                value = next((getattr(text, k) for k in keys if isinstance(getattr(text, k, None), int)), None)
                if value is None:
                    raise ConfigError(f"cannot read {field} from {type(model).__name__}'s config (looked for "
                                      f"{list(keys)}); set {type(self).__name__}({field}=...)")
                setattr(self, field, value)
        if self.num_transformer_submodules is None:  # encoder-decoder models: virtual tokens on both sides
            self.num_transformer_submodules = 2 if getattr(model_config, "is_encoder_decoder", False) else 1
