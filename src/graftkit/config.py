"""Adapter configs: the base dataclass, the ecosystem's enums, and ``adapter_config.json`` read/write.

The on-disk keys are a fact of the ecosystem: HF peft, vLLM and other readers expect the same
``adapter_config.json``. A method's config is a dataclass whose fields are the keys it understands;
keys that belong to features graftkit does not implement are listed in ``peft_only_fields`` with their
inert default, so that a saved file carries the full key set and a loaded file that *uses* one of those
features fails loudly instead of silently training something else.

Unknown keys (written by a newer version of either library) are dropped with a warning naming them.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import os
import warnings
from typing import Any, ClassVar

from .errors import ConfigError, UnsupportedError

CONFIG_NAME = "adapter_config.json"
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

    # Keys of features that only HF peft implements, with the inert value that means "not used".
    peft_only_fields: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        if self.task_type is not None:
            try:
                self.task_type = TaskType(str(self.task_type))
            except ValueError:
                raise ConfigError(
                    f"task_type={self.task_type!r} is not a task type; expected one of "
                    f"{[t.value for t in TaskType]} or None"
                ) from None

    # ------------------------------------------------------------------ dict / JSON
    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict that ``adapter_config.json`` holds (peft's key set)."""
        out = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        for key, default in self.peft_only_fields.items():
            out.setdefault(key, copy.deepcopy(default))
        if out.get("peft_version") is None:
            out["peft_version"] = FORMAT_PEFT_VERSION
        return out

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
            target = config_class(str(peft_type), source=source)
            if cls is not PeftConfig and not issubclass(target, cls):
                raise ConfigError(f"{source}: peft_type={peft_type!r} is not a {cls.__name__}")
        names = {f.name for f in dataclasses.fields(target)}
        kwargs = {k: v for k, v in data.items() if k in names}
        for key, inert in target.peft_only_fields.items():
            if key in data and data[key] != inert and data[key] not in (None, False, {}, []):
                raise UnsupportedError(
                    f"{source}: '{key}'={data[key]!r} turns on a feature graftkit does not implement; "
                    f"use an adapter without it (graftkit reads '{key}'={inert!r})"
                )
        unknown = sorted(set(data) - names - set(target.peft_only_fields))
        if unknown:
            warnings.warn(
                f"{source}: ignoring keys graftkit does not know (written by a newer version?): {unknown}",
                stacklevel=3,
            )
        kwargs.pop("peft_type", None)
        try:
            return target(**kwargs)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise ConfigError(f"{source}: {exc}") from None
            raise ConfigError(f"{source}: invalid value: {exc}") from exc

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> PeftConfig:
        """Read an ``adapter_config.json``.

        Raises:
            ConfigError: the file is missing, is not valid JSON, or holds an invalid config.
        """
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file; an adapter folder holds {CONFIG_NAME}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc}); re-save the adapter or fix the file") from None
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
        from .io import resolve_adapter_file

        path = resolve_adapter_file(
            pretrained_model_name_or_path, CONFIG_NAME, subfolder=subfolder, revision=revision, **hub_kwargs
        )
        return cls.from_json_file(path)

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` (atomically)."""
        from .io import atomic_write_text

        os.makedirs(save_directory, exist_ok=True)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), self.to_json_string())

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
        super().__post_init__()
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError(
                "layers_to_transform cannot be combined with a regex target_modules; "
                "put the layer indices into the regex, or pass target_modules as a list"
            )
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ConfigError("layers_pattern is only used with layers_to_transform; set both, or neither")
