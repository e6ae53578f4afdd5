"""``PeftModel``: a base model with named adapters, and the functions that build one.

Layout (the same module paths as the ecosystem, so tensor names and user code carry over)::

    PeftModel
      .base_model : AdapterModel
          .model : the transformers model, with AdaptedLayer / ModulesToSave wrappers swapped in

Saved tensor names are the model's own parameter paths under ``base_model.model.``, with the adapter name
dropped: ``<path>.lora_A.<name>.weight`` is saved as ``<path>.lora_A.weight`` and
``<path>.modules_to_save.<name>.weight`` as ``<path>.weight``. Adapters other than ``"default"`` are saved in a
subfolder named after them.

Task classes differ only in what truly differs per task (default ``modules_to_save`` of classifier heads).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import warnings
import weakref
from collections import namedtuple
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from .config import PeftConfig, TaskType, TunerConfig
from .errors import (
    AdapterNameError,
    CheckpointError,
    ConfigError,
    GraftkitError,
    PeftWarning,
    TargetError,
    UnsupportedError,
    UsageError,
)
from .inject import find_modules_to_save, inject, iter_modules, set_submodule
from .io import (
    README_NAME,
    model_card,
    read_checkpoint,
    resolve_adapter_dir,
    save_adapter_files,
    save_checkpoint,
    text_writer,
)
from .layer import BASE, AdaptedLayer, ModelAdapter, ModulesToSave, Nest, Routing, check_adapter_name
from .registry import loading, method_for
from .weights import dense_linear, full_copies, is_quantized, numel_of, shape_of, writable

PREFIX = "base_model.model."
_OWNERS: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()  # base -> its PeftModel
_FORWARD_INPUTS: dict[type, frozenset[str]] = {}


# ---------------------------------------------------------------------------------------------- model-level helpers
def wrappers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer | ModulesToSave]]:
    """Every graftkit wrapper in ``model`` with its module path."""
    for name, module in iter_modules(model):
        if isinstance(module, (AdaptedLayer, ModulesToSave)):
            yield name, module
            if isinstance(module, AdaptedLayer):  # wrappers inside its base (LoRA on MHA adapts its out_proj too; a
                # layer per adapted parameter of one module nests)
                yield from ((f"{name}.base_layer{'.' if inner else ''}{inner}", m)
                            for inner, m in wrappers(module.base_layer))


def put_back(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` in place of the wrapper there; a :class:`Nest` left holding no adapted layer goes
    too (its place takes ``module``)."""
    set_submodule(model, path, module)
    parent_path, _, _ = path.rpartition(".")
    if parent_path and not isinstance(module, AdaptedLayer) and isinstance(model.get_submodule(parent_path), Nest):
        set_submodule(model, parent_path, module)


def activate(model: nn.Module, names: list[str]) -> None:
    """Make ``names`` the active adapters of every wrapper (a wrapper skips the names it does not hold)."""
    for _, module in wrappers(model):
        if isinstance(module, AdaptedLayer):
            module.active = [n for n in names if n in module.adapters]
        else:
            module.active = next((n for n in names if n in module.modules_to_save), None)


def mark_trainable(model: nn.Module, configs: dict[str, PeftConfig], names: list[str], train: bool = True,
                   prompt_encoder: nn.ModuleDict | None = None) -> None:
    """Freeze everything, then (``train``) unfreeze what the adapters ``names`` own."""
    for param in model.parameters():
        param.requires_grad_(False)
    for module in (prompt_encoder or {}).values():
        module.requires_grad_(False)
    if not train:
        return
    for name in names:
        unfreeze_adapter(model, configs[name], name, prompt_encoder)


def unfreeze_adapter(model: nn.Module, config: PeftConfig, name: str,
                     prompt_encoder: nn.ModuleDict | None = None) -> None:
    """Make what adapter ``name`` owns require grad (its fixed tensors excepted); nothing else changes."""
    if prompt_encoder is not None and name in prompt_encoder:
        prompt_encoder[name].requires_grad_(True)
    for _, module in wrappers(model):
        if isinstance(module, AdaptedLayer) and name in module.adapters:
            adapter = module.adapters[name]
            adapter.requires_grad_(True)
            for frozen in adapter.frozen_parameters:  # tensors the method keeps fixed (MiCA's B)
                adapter.get_parameter(frozen).requires_grad_(False)
        elif isinstance(module, ModulesToSave) and name in module.modules_to_save:
            module.modules_to_save[name].requires_grad_(True)
    for _, param in method_for(config).extra_trainable(model, config):
        param.requires_grad_(True)


def adapter_tensors(model: nn.Module, name: str, config: PeftConfig,
                    model_adapter: ModelAdapter | None = None) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under their saved names (live tensors, not copies)."""
    out: dict[str, torch.Tensor] = dict(model_adapter.saved_tensors()) if model_adapter is not None else {}
    for path, module in wrappers(model):
        if isinstance(module, AdaptedLayer) and name in module.adapters:
            part = module.adapters[name]
        elif isinstance(module, ModulesToSave) and name in module.modules_to_save:
            part = module.modules_to_save[name]
        else:
            continue
        saved = part.saved_tensors() if isinstance(module, AdaptedLayer) else part.state_dict(keep_vars=True)
        for key, tensor in saved.items():
            out[f"{PREFIX}{path}.{key}"] = tensor
    for key, param in method_for(config).extra_trainable(model, config):
        out[PREFIX + key] = param
    return out


IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


def memory_names(model: nn.Module) -> dict[int, str]:
    """id(tensor) -> its in-memory state-dict key (the first of a tensor held under several names)."""
    names: dict[int, str] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), key)
    return names


def saved_to_memory(model: PeftModel, adapter_name: str) -> dict[str, str]:
    """Saved key -> in-memory key of adapter ``adapter_name``'s tensors (paired by the tensors themselves: the saved
    tensor is the live one, so no string rewriting, and every method maps the same way)."""
    names = memory_names(model)
    saved = model.get_adapter_state_dict(adapter_name)
    out = {key: names[id(t)] for key, t in saved.items() if id(t) in names}
    for key, tensor in embedding_base_tensors(model.model).items():
        if id(tensor) in names:
            out[key] = names[id(tensor)]
    return out


def guess_memory_name(model: nn.Module, key: str, adapter_name: str) -> str:
    """How a saved key the adapter does not hold is reported: on an adapted layer, with the adapter name after its
    attribute (where it would have gone); elsewhere, as given."""
    head, _, last = key.rpartition(".")
    attr_path = head if last in ("weight", "bias") else key
    layer_path = attr_path.rpartition(".")[0].removeprefix(PREFIX)
    try:
        layer = model.get_submodule(layer_path) if layer_path else None
    except AttributeError:
        layer = None
    if not isinstance(layer, AdaptedLayer):
        return key
    return f"{head}.{adapter_name}.{last}" if attr_path == head else f"{key}.{adapter_name}"


def embedding_base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base weights of adapted input/output embeddings (saved beside the adapter, as the ecosystem does)."""
    layers = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        with contextlib.suppress(NotImplementedError, AttributeError):
            layers.append(fn() if callable(fn) else None)
    out = {}
    for path, module in wrappers(model):
        if isinstance(module, AdaptedLayer) and any(module is layer or module.base_layer is layer for layer in layers):
            out[f"{PREFIX}{path}.base_layer.weight"] = module.base_layer.weight
    return out


def _ids_as_keyword(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Move a positional ``input_ids`` into the keywords (prompt methods rewrite the inputs by name)."""
    if args and isinstance(args[0], torch.Tensor) and "input_ids" not in kwargs:
        return args[1:], {**kwargs, "input_ids": args[0]}
    return args, kwargs


def _batch_rows(args: tuple, kwargs: dict[str, Any]) -> int | None:
    """The number of input rows of a forward/generate call (``None`` when no batched tensor input is found)."""
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value.shape[0]
    return None


def check_base_model(model: Any) -> None:
    """Refuse a base model that already carries another PeftModel's adapters (or is a PeftModel).

    Two PeftModels wrapping one set of layers would change each other: a new adapter, a failed load's clean-up
    or an unload in one would silently change what the other computes.

    Raises:
        UsageError: ``model`` is not a module, is a PeftModel, or holds graftkit wrappers.
    """
    if isinstance(model, PeftModel):
        raise UsageError(f"the model is already a {type(model).__name__}; add more adapters to it with "
                         "add_adapter() / load_adapter() instead of wrapping it again")
    if not isinstance(model, nn.Module):
        raise UsageError(f"the base model must be a torch nn.Module, got {type(model).__name__}")
    wrapped = [path for path, _ in wrappers(model)]
    if wrapped:
        raise UsageError(
            f"{type(model).__name__} already carries graftkit adapter layers (e.g. '{wrapped[0]}'), from another "
            "PeftModel or inject_adapter_in_model. Wrapping it again would change that model too: add the adapter "
            "to the existing PeftModel (add_adapter / load_adapter), call unload() on it first, or pass a fresh "
            "copy of the base model"
        )


def name_list(value: Any, what: str) -> list[str]:
    """``value`` (one adapter name or a list of them) as a list of names.

    Raises:
        AdapterNameError: neither a string nor a list of strings.
    """
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise AdapterNameError(f"{what} must be an adapter name or a list of adapter names, got {value!r:.80}")
    return list(names)


def as_config(config: Any) -> PeftConfig:
    """``config`` as a :class:`PeftConfig` (a dict is read as ``adapter_config.json`` would be).

    Raises:
        ConfigError: neither a config object nor a valid config dict.
    """
    if isinstance(config, PeftConfig):
        return config
    if isinstance(config, dict):
        return PeftConfig.from_dict(config, source="config dict")
    raise ConfigError(f"expected an adapter config such as LoraConfig(...), got {type(config).__name__}")


# ---------------------------------------------------------------------------------------------- classes
class AdapterModel(nn.Module):
    """The module at ``PeftModel.base_model``: holds the adapted transformers model as ``.model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    # What code written for the ecosystem reaches through ``model.base_model`` (its tuner object): the PeftModel's own.
    _OWNER_API = frozenset({
        "peft_config", "active_adapter", "active_adapters", "set_adapter", "delete_adapter", "update_and_allocate",
        "disable_adapter_layers", "enable_adapter_layers", "merge_adapter", "unmerge_adapter", "merge_and_unload",
        "unload", "add_weighted_adapter", "get_layer_status", "get_model_status"})

    def _owner(self, what: str) -> PeftModel:
        owner = _OWNERS.get(self.model)
        if owner is None or owner() is None:
            raise UsageError(f"base_model.{what} needs the PeftModel that owns this model, and it is gone")
        return owner()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")  # absent before __init__ (DeepSpeed's zero.Init looks early)
            if name == "model" or modules is None or "model" not in modules:
                raise
            if name in AdapterModel._OWNER_API:
                return getattr(self._owner(name), name)
            return getattr(modules["model"], name)


class PeftModel(nn.Module):
    """A base model with named adapters.

    Args:
        model: the base model (a transformers ``PreTrainedModel`` or any ``nn.Module``); changed in place.
        peft_config: the first adapter's config.
        adapter_name: the first adapter's name.
        autocast_adapter_dtype: keep adapter weights in fp32 over fp16/bf16 bases (compute still runs in the
            activation dtype); ``False`` creates them in the base weight dtype.
    """

    default_modules_to_save: ClassVar[list[str]] = []
    task_type: ClassVar[TaskType | None] = None

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
    ) -> None:
        check_base_model(model)
        peft_config = as_config(peft_config)
        super().__init__()
        self.__dict__["_model"] = model  # the adapted model, whatever ``base_model`` is (below)
        self.base_model = AdapterModel(model)
        self.peft_config: dict[str, PeftConfig] = {}
        self._active: list[str] = []
        self._train_active = True  # whether the active adapters require grad
        self._disabled = False  # inside disable_adapter(): model adapters (prompt methods) step aside too
        self.prompt_encoder = nn.ModuleDict()  # adapters that act on the model's inputs (see layer.ModelAdapter)
        self.add_adapter(adapter_name, peft_config, autocast_adapter_dtype=autocast_adapter_dtype)
        self.set_adapter(adapter_name, inference_mode=peft_config.inference_mode)
        _OWNERS[model] = weakref.ref(self)
        if adapter_name in self.prompt_encoder and self.prompt_encoder[adapter_name].bare_base_model:
            # The ecosystem's layout for adapters that act on the inputs: base_model is the model itself, with the
            # adapters in prompt_encoder.<name> and its input embedding as word_embeddings beside it.
            self._modules["base_model"] = model
            embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            if isinstance(embeddings, nn.Module):
                self.word_embeddings = embeddings

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")  # absent before __init__ (DeepSpeed's zero.Init looks early)
            if name == "base_model" or modules is None or "base_model" not in modules:
                raise
            return getattr(modules["base_model"], name)

    @property
    def model(self) -> nn.Module:  # the adapted model (peft users reach it as base_model.model, or base_model)
        model = self.__dict__.get("_model")
        if model is None:  # read before __init__ (DeepSpeed's zero.Init looks early)
            raise AttributeError("model")
        return model

    # ------------------------------------------------------------------ adapters
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active[0] if len(self._active) == 1 else list(self._active)

    def _prepare_config(self, config: PeftConfig) -> PeftConfig:
        return self._prepare_config_for(self.model, config)

    @classmethod
    def _prepare_config_for(cls, model: nn.Module, config: PeftConfig) -> PeftConfig:
        """A copy of ``config`` with the task class's defaults filled in (task type, classifier heads, base name)."""
        config = config.copy()
        if cls.default_modules_to_save and hasattr(config, "modules_to_save"):
            extra = [m for m in cls.default_modules_to_save if m not in (config.modules_to_save or [])]
            config.modules_to_save = list(config.modules_to_save or []) + extra
        if config.task_type is None and cls.task_type is not None:
            config.task_type = cls.task_type
        if config.base_model_name_or_path is None:
            name = getattr(getattr(model, "config", None), "_name_or_path", None)
            config.base_model_name_or_path = name or None
        return config

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add a new adapter (not activated: use :meth:`set_adapter`).

        Args:
            low_cpu_mem_usage: accepted for HF peft's signature; graftkit builds the (small) adapter weights
                directly, which loading replaces anyway.
            autocast_adapter_dtype: keep this adapter's weights in float32 over a float16/bfloat16 base (compute
                still runs in the activation dtype); ``False`` creates them in the base weight dtype.

        Raises:
            AdapterNameError: the name is taken.
            TargetError: its targets match nothing, or an unsupported layer kind.
        """
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise AdapterNameError(f"adapter '{adapter_name}' already exists; delete_adapter() it or pick another name")
        config = self._prepare_config(as_config(peft_config))
        user_names = [m for m in (getattr(config, "modules_to_save", None) or [])
                      if m not in self.default_modules_to_save]
        missing = [m for m in user_names if not find_modules_to_save(self.model, [m])]
        if missing:
            raise TargetError(
                f"modules_to_save {missing} match no module of {type(self.model).__name__}; check the names"
            )
        if self.default_modules_to_save and not find_modules_to_save(self.model, config.modules_to_save or []):
            heads = " or ".join(repr(m) for m in self.default_modules_to_save)
            raise UsageError(
                f"task_type {config.task_type} trains the model's task head ({heads}), but {type(self.model).__name__} "
                "has none: is the task_type right for this model? (Name a custom head in modules_to_save)"
            )
        method_for(config).check_new_adapter(config, list(self.peft_config.values()))
        try:
            module = method_for(config).attach(self.model, config, adapter_name)
            if module is not None:
                self.prompt_encoder[adapter_name] = module
        except BaseException:
            self._remove_modules(adapter_name)
            raise
        if not autocast_adapter_dtype:  # adapters in the base weight dtype instead of fp32 masters
            for _, module in wrappers(self.model):
                if isinstance(module, AdaptedLayer) and adapter_name in module.adapters:
                    dtype = next(module.base_layer.parameters()).dtype
                    if dtype.is_floating_point:
                        module.adapters[adapter_name].to(dtype)
        self.peft_config[adapter_name] = config
        mark_trainable(self.model, self.peft_config, self._active, self._train_active, self.prompt_encoder)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter (or several, whose updates add up, in order).

        The active adapters require grad (unless ``inference_mode``); every other adapter is frozen. Merged
        adapters are unmerged first.
        """
        names = name_list(adapter_name, "adapter_name")
        if not names:
            raise UsageError("set_adapter() needs at least one adapter name; to run the base model alone use "
                             "disable_adapter() (a context manager) or disable_adapter_layers()")
        if self.__dict__.get("_unloaded"):
            raise UsageError("set_adapter() after unload() / merge_and_unload(): the adapters' layers are gone from "
                             "the model. Wrap the base model again (get_peft_model / PeftModel.from_pretrained)")
        for name in names:
            if not isinstance(name, str) or name not in self.peft_config:
                raise AdapterNameError(f"no adapter named '{name}'; adapters: {sorted(self.peft_config)}")
        if sum(n in self.prompt_encoder for n in names) > 1:
            raise UsageError(f"adapters {[n for n in names if n in self.prompt_encoder]} each change the model's "
                             "inputs (prompt methods); activate one of them at a time")
        if any(isinstance(m, AdaptedLayer) and m.merged for _, m in wrappers(self.model)):
            warnings.warn("set_adapter on a merged model: unmerging first", stacklevel=2)
            self.unmerge_adapter()
        self._active = names
        self._train_active = not inference_mode
        activate(self.model, names)
        self._model_adapter(None)  # the active prompt-style adapter takes its place in the model now
        mark_trainable(self.model, self.peft_config, names, self._train_active, self.prompt_encoder)

    def _remove_modules(self, adapter_name: str) -> None:
        if adapter_name in self.prompt_encoder:
            self.prompt_encoder[adapter_name].detach()
            del self.prompt_encoder[adapter_name]
        for path, module in list(wrappers(self.model)):
            if isinstance(module, AdaptedLayer) and adapter_name in module.adapters:
                module.remove(adapter_name)
                if not module.adapters:
                    put_back(self.model, path, module.base_layer)
            elif isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
                module.remove(adapter_name)
                if not module.modules_to_save:
                    put_back(self.model, path, module.original_module)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and its modules; the remaining active adapters stay active."""
        if adapter_name not in self.peft_config:
            raise AdapterNameError(f"no adapter named '{adapter_name}'; adapters: {sorted(self.peft_config)}")
        self._remove_modules(adapter_name)
        del self.peft_config[adapter_name]
        remaining = [n for n in self._active if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]  # as the ecosystem does: another adapter takes over
            self._train_active = True
        self._active = remaining
        activate(self.model, self._active)
        self._model_adapter(None)
        mark_trainable(self.model, self.peft_config, self._active, self._train_active, self.prompt_encoder)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: inside it the model is the base model (adapters skipped, merged ones taken out)."""
        self.disable_adapter_layers()
        try:
            yield
        finally:
            self.enable_adapter_layers()

    def disable_adapter_layers(self) -> None:
        """Run the base model alone; the adapters' weights are frozen meanwhile, as HF peft freezes them."""
        self._disabled = True
        for _, module in wrappers(self.model):
            if isinstance(module, AdaptedLayer) and module.merged_adapters:
                module.unmerge()  # now, not at its next forward: some layers' forwards never run (MHA's out_proj)
            module.disabled = True
            for held in (module.adapters.values() if isinstance(module, AdaptedLayer) else (module.modules_to_save,)):
                held.requires_grad_(False)
        for adapter in self.prompt_encoder.values():
            adapter.requires_grad_(False)

    def enable_adapter_layers(self) -> None:
        """Undo :meth:`disable_adapter_layers`: the active adapters run, and train again unless loaded frozen."""
        self._disabled = False
        for _, module in wrappers(self.model):
            module.disabled = False
        if self._train_active:
            for name in self._active:
                unfreeze_adapter(self.model, self.peft_config[name], name, self.prompt_encoder)

    # ------------------------------------------------------------------ trainers that do not know graftkit
    def train(self, mode: bool = True) -> PeftModel:
        if mode and "transformers.trainer" in sys.modules:  # a plain transformers/TRL trainer gets a clear message
            from .integrations.trainer import check_plain_trainer_training

            check_plain_trainer_training(self)
        return super().train(mode)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if "transformers.trainer" in sys.modules:  # the plain Trainer's checkpoint: a clear error, not a raw crash
            from .integrations.trainer import refuse_plain_trainer_checkpoint

            refuse_plain_trainer_checkpoint()
        return super().state_dict(*args, **kwargs)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        *args: Any,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        adapter_names: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """The model's forward. ``adapter_names``: one adapter name per batch row (``"__base__"``: no adapter).

        The named inputs are the ones datasets carry; listing them lets tools that read this signature (the
        transformers Trainer's ``remove_unused_columns``) keep those columns. Names the base model's forward does
        not take are dropped; positional arguments and other keywords go through unchanged.
        """
        named = {
            "input_ids": input_ids, "attention_mask": attention_mask, "inputs_embeds": inputs_embeds,
            "labels": labels, "token_type_ids": token_type_ids, "position_ids": position_ids,
            "decoder_input_ids": decoder_input_ids, "decoder_attention_mask": decoder_attention_mask,
            "pixel_values": pixel_values, "start_positions": start_positions, "end_positions": end_positions,
        }
        accepted = self._forward_inputs()
        kwargs.update({k: v for k, v in named.items() if v is not None and k in accepted})
        hook = self._model_adapter(adapter_names)
        if hook is not None:
            args, kwargs = _ids_as_keyword(args, kwargs)
            out = self.model(**hook.prepare(self.model, kwargs))
        elif adapter_names is None:
            out = self.model(*args, **kwargs)
        else:
            with self._mixed_batch(adapter_names, _batch_rows(args, kwargs)):
                out = self.model(*args, **kwargs)
        if self.training and isinstance(getattr(out, "loss", None), torch.Tensor):
            penalty = self.training_penalty()
            if penalty is not None:
                out.loss = out.loss + penalty
        return out

    def training_penalty(self) -> torch.Tensor | None:
        """The sum of the active adapters' training penalties (AdaLoRA's orthogonality term), which forward adds to
        the loss in training mode; ``None`` when no method has one (or adapters are disabled). A loss computed
        outside the model (label smoothing in ``graftkit.Trainer``) adds it from here."""
        if self._disabled:
            return None
        total = None
        for name in self._active:
            config = self.peft_config[name]
            term = method_for(config).regularization(self.model, config, name)
            if term is not None:
                total = term if total is None else total + term
        return total

    def training_state(self) -> dict[str, torch.Tensor]:
        """What the adapters' methods keep between optimizer steps besides the weights (AdaLoRA's importance
        averages), as ``"<adapter>/<key>"`` tensors; ``graftkit.Trainer`` writes it into its checkpoints."""
        out = {}
        for name, config in self.peft_config.items():
            for key, tensor in method_for(config).training_state(self.model, config, name).items():
                out[f"{name}/{key}"] = tensor
        return out

    def load_training_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take back :meth:`training_state` (resuming a run); entries of adapters this model lacks are refused.

        Raises:
            CheckpointError: an entry names an unknown adapter or does not fit it.
        """
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            name, _, rest = key.partition("/")
            if name not in self.peft_config:
                raise CheckpointError(f"training state '{key}' belongs to adapter '{name}', which this model lacks; "
                                      f"adapters: {sorted(self.peft_config)}")
            parts.setdefault(name, {})[rest] = tensor
        for name, part in parts.items():
            config = self.peft_config[name]
            method_for(config).load_training_state(self.model, config, name, part)

    def update_and_allocate(self, global_step: int) -> None:
        """Run the per-step work of the active adapters' methods (AdaLoRA prunes ranks to its budget); a no-op for
        methods without any. In a plain training loop call it every optimizer step, after ``loss.backward()`` and
        before ``optimizer.zero_grad()``; ``graftkit.Trainer`` calls it itself.

        Raises:
            UsageError: an AdaLoRA adapter has no gradients (called after ``zero_grad()``).
        """
        for name in self._active:
            config = self.peft_config[name]
            method_for(config).update_and_allocate(self.model, config, name, int(global_step))

    def _model_adapter(self, adapter_names: list[str] | None) -> ModelAdapter | None:
        """The active adapter that changes the model's inputs (a prompt method), if any and not disabled."""
        adapters = self._modules["prompt_encoder"]._modules  # read directly: this runs on every forward
        if not adapters:
            return None
        active = [adapters[n] for n in self._active if n in adapters]
        chosen = active[0] if active and not self._disabled else None
        for module in adapters.values():  # hooks inside the model (adaption prompts) act only for the chosen one,
            module.live = module is chosen  # also when gradient checkpointing re-runs a layer in backward
        if chosen is not None and adapter_names is not None:
            raise UsageError("adapter_names (one adapter per row) is not supported while a prompt-style adapter "
                             f"({[n for n in self._active if n in self.prompt_encoder][0]}) is active: it changes "
                             "every row's computation. Run one adapter per call")
        return chosen

    def _forward_inputs(self) -> frozenset[str]:
        """Parameter names of the base model's forward (cached per base class)."""
        cls = type(self.model)
        cached = _FORWARD_INPUTS.get(cls)
        if cached is None:
            import inspect

            cached = frozenset(inspect.signature(cls.forward).parameters)
            _FORWARD_INPUTS[cls] = cached
        return cached

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The model's ``generate``; ``adapter_names`` as in :meth:`forward` (beams follow their input row)."""
        hook = self._model_adapter(adapter_names)
        if hook is not None:
            args, kwargs = _ids_as_keyword(args, kwargs)
            if args:
                raise UsageError("pass generate's inputs by keyword (input_ids=..., attention_mask=...)")
            return hook.generate(self.model, kwargs)
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        with self._mixed_batch(adapter_names, _batch_rows(args, kwargs)):
            return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _mixed_batch(self, adapter_names: list[str], rows: int | None) -> Iterator[None]:
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise UsageError(f"adapter_names must be a list with one adapter name per input row, got "
                             f"{type(adapter_names).__name__} {adapter_names!r:.60}; e.g. adapter_names=['a', 'b']")
        if not all(isinstance(n, str) for n in adapter_names):
            raise UsageError("adapter_names must hold adapter names (strings), got "
                             f"{sorted({type(n).__name__ for n in adapter_names})}")
        if rows is not None and len(adapter_names) != rows:
            raise UsageError(f"adapter_names has {len(adapter_names)} entries for {rows} input rows; pass one "
                             "adapter name per input row (beams and num_return_sequences follow their input row)")
        unknown = sorted({n for n in adapter_names if n != BASE and n not in self.peft_config})
        if unknown:
            raise AdapterNameError(
                f"adapter_names has unknown adapter(s) {unknown}; adapters: {sorted(self.peft_config)} or '{BASE}'"
            )
        layers = [m for _, m in wrappers(self.model)]
        if any(isinstance(m, AdaptedLayer) and m.merged for m in layers):
            raise UsageError("adapter_names cannot be used while adapters are merged; call unmerge_adapter() first")
        device = next((p.device for p in self.parameters()), None)
        routing = Routing(list(adapter_names), device)
        for module in layers:
            module.routing = routing
        try:
            yield
        finally:
            for module in layers:
                module.routing = None

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """Turn on the base model's gradient checkpointing, with gradients flowing from the (frozen) input
        embeddings, so that adapters inside checkpointed blocks get gradients with reentrant checkpointing too."""
        base = self.model
        enable = getattr(base, "gradient_checkpointing_enable", None)
        if enable is None:
            raise GraftkitError(f"{type(base).__name__} has no gradient_checkpointing_enable()")
        enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)
        enable_input_grads(base)

    def get_base_model(self) -> nn.Module:
        """The transformers model (with adapters in it; see :meth:`unload` for a clean one)."""
        return self.model

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str | None = None,
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Add ``adapter_name``, a weighted combination of existing adapters (not activated, frozen).

        ``combination_type`` (LoRA): ``svd`` (the default), ``linear``, ``cat``, ``ties``, ``dare_linear``,
        ``dare_ties``, ``magnitude_prune`` and the ``*_svd`` forms of the last four (see the method's
        ``combine_into``). IA3 adapters combine as the weighted sum of their vectors (``linear``, its default).

        Raises:
            AdapterNameError: an unknown source adapter, or a taken name.
            ConfigError: weights that do not match the adapters, ranks that the combination cannot mix.
        """
        adapters = name_list(adapters, "adapters")
        for name in adapters:
            if name not in self.peft_config:
                raise AdapterNameError(f"no adapter named '{name}'; adapters: {sorted(self.peft_config)}")
        if not isinstance(weights, (list, tuple)) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
            raise ConfigError(f"add_weighted_adapter weights must be a list of finite numbers, got {weights!r:.80}")
        if len(weights) != len(adapters):
            raise ConfigError(f"add_weighted_adapter got {len(adapters)} adapters but {len(weights)} weights")
        methods = {method_for(self.peft_config[a]) for a in adapters}
        if len(methods) != 1:
            kinds = sorted(m.peft_type for m in methods)
            raise ConfigError(f"add_weighted_adapter needs adapters of one method, got {kinds}")
        method = methods.pop()
        shared = [p for p, m in wrappers(self.model)
                  if isinstance(m, ModulesToSave) and sum(a in m.modules_to_save for a in adapters) > 1]
        if shared:
            raise ConfigError(f"adapters {adapters} each train their own copy of {shared} (modules_to_save); "
                              "such copies cannot be combined")
        paths = [p for p, m in wrappers(self.model)
                 if isinstance(m, AdaptedLayer) and any(a in m.adapters for a in adapters)]
        combination, config = method.weighted_config(
            [self.peft_config[a] for a in adapters], combination_type, svd_rank, paths
        )
        self.add_adapter(adapter_name, config)
        try:
            for _, module in wrappers(self.model):
                if isinstance(module, AdaptedLayer) and adapter_name in module.adapters:
                    sources = [(module.adapters[a] if a in module.adapters else None, w)
                               for a, w in zip(adapters, weights)]
                    method.combine_into(
                        module.adapters[adapter_name], sources, combination, density=density,
                        majority_sign_method=majority_sign_method, svd_clamp=svd_clamp,
                        svd_full_matrices=svd_full_matrices, svd_driver=svd_driver,
                    )
        except BaseException:
            self.delete_adapter(adapter_name)  # no half-combined adapter is left behind
            raise

    # ------------------------------------------------------------------ counting
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; tied weights counted once, 4-bit weights at their unpacked size."""
        trainable = total = 0
        for _, param in self.named_parameters():
            count = numel_of(param)  # a ZeRO-3 partition counts whole
            if type(param).__name__ == "Params4bit":
                # 4-bit storage packs two values per byte of its storage dtype
                itemsize = param.element_size() if hasattr(param, "element_size") else 1
                count = count * 2 * itemsize
            total += count
            if param.requires_grad:
                trainable += count
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        share = 100 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")

    # ------------------------------------------------------------------ merge / unload
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False,
                      allow_non_finite: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weights; :meth:`unmerge_adapter` undoes it.

        Every merged weight is checked before any is written: NaN/Inf is refused and the model stays as it was
        (``safe_merge`` is always on; ``allow_non_finite=True`` skips the check).

        Raises:
            UsageError: a merged weight would hold NaN or Inf.
        """
        names = self._merge_names(adapter_names)
        holders = [m for _, m in wrappers(self.model) if isinstance(m, AdaptedLayer) and set(names) & set(m.adapters)]
        if holders and all(n in m.merged_adapters for m in holders for n in names if n in m.adapters):
            warnings.warn(f"adapters {names} are merged already; nothing to merge", UserWarning, stacklevel=2)
            return
        self._merge_all(adapter_names, allow_non_finite)

    def unmerge_adapter(self) -> None:
        for _, module in wrappers(self.model):
            if isinstance(module, AdaptedLayer):
                module.unmerge()

    def _merge_names(self, adapter_names: list[str] | str | None) -> list[str]:
        names = adapter_names if adapter_names is not None else self._active
        names = name_list(names, "adapter_names")
        for name in names:
            if name not in self.peft_config:
                raise AdapterNameError(f"no adapter named '{name}'; adapters: {sorted(self.peft_config)}")
            if name in self.prompt_encoder:
                raise UnsupportedError(f"adapter '{name}' ({self.peft_config[name].peft_type}) changes the model's "
                                       "inputs and has no weights to merge into the base model; use unload() to get "
                                       "the base model back")
        return names

    def _check_merges(self, adapter_names: list[str] | str | None) -> None:
        """Refuse (before anything is written) a merge that would put NaN/Inf into any base weight."""
        names = self._merge_names(adapter_names)
        for path, module in wrappers(self.model):
            if isinstance(module, AdaptedLayer):
                module.check_merge(names, module_name=path)

    def _merge_all(self, adapter_names: list[str] | str | None, allow_non_finite: bool) -> None:
        names = self._merge_names(adapter_names)
        layers = [(p, m) for p, m in wrappers(self.model) if isinstance(m, AdaptedLayer)]
        if any(is_quantized(m.base_layer) for _, m in layers):
            warnings.warn(
                "merging into a quantized base layer re-quantizes the merged weight, which rounds the adapter's update "
                "to the quantization grid; merge_and_unload(dequantize=True) gives a full-precision merged model",
                stacklevel=3,
            )
        if not allow_non_finite:  # every layer is checked before any is written
            self._check_merges(names)
        done: list[AdaptedLayer] = []
        try:
            for _, module in layers:
                module.merge(names)
                done.append(module)
        except BaseException:
            for module in done:  # leave the model as it was
                module.unmerge()
            raise

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        dequantize: bool = False,
        allow_non_finite: bool = False,
    ) -> nn.Module:
        """Merge adapters into the base weights and return the plain base model (no graftkit modules left).

        Args:
            dequantize: on a quantized base (bitsandbytes 4/8-bit), first replace every quantized linear layer by a
                full-precision ``nn.Linear`` and merge there: a full-precision merged model, with no re-quantization
                rounding, that ``save_pretrained`` writes as an ordinary checkpoint.
            allow_non_finite: merge even where a merged weight would hold NaN/Inf (by default that is refused
                before anything is written, as ``safe_merge`` does; ``safe_merge`` is always on).

        Raises:
            UsageError: a merged weight would hold NaN/Inf (the model is unchanged).
        """
        if not allow_non_finite:  # before dequantizing, which cannot be undone
            self._check_merges(adapter_names)
        if dequantize:
            self._dequantize_base()
        self._merge_all(adapter_names, allow_non_finite=True)  # checked above
        return self._unwrap(merge=True)

    def _dequantize_base(self) -> None:
        config_dtype = getattr(getattr(self.model, "config", None), "dtype", None)
        dtype = config_dtype if isinstance(config_dtype, torch.dtype) and config_dtype.is_floating_point else None
        for path, module in list(self.model.named_modules()):
            if path and is_quantized(module):
                set_submodule(self.model, path, dense_linear(module, dtype))
        quantizer = getattr(self.model, "hf_quantizer", None)
        if quantizer is not None:  # the model is no longer quantized: drop transformers' record of it
            quantizer.remove_quantization_config(self.model)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the original base model."""
        self.unmerge_adapter()
        return self._unwrap(merge=False)

    def _unwrap(self, merge: bool) -> nn.Module:
        self.__dict__["_unloaded"] = True
        for module in self.prompt_encoder.values():
            module.detach()
        for path, module in reversed(list(wrappers(self.model))):  # inner wrappers first: their paths stay valid
            if isinstance(module, AdaptedLayer):
                for name in list(module.adapters):  # unmerged adapters give back what they took from the base
                    module.release(name)
                put_back(self.model, path, module.base_layer)
            else:
                put_back(self.model, path, module.current() if merge else module.original_module)
        return self.model

    # ------------------------------------------------------------------ save / load
    def get_adapter_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """Adapter tensors under their saved names (what ``save_pretrained`` writes, without embeddings)."""
        if adapter_name not in self.peft_config:
            raise AdapterNameError(f"no adapter named '{adapter_name}'; adapters: {sorted(self.peft_config)}")
        return adapter_tensors(self.model, adapter_name, self.peft_config[adapter_name],
                               self.prompt_encoder[adapter_name] if adapter_name in self.prompt_encoder else None)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: bool | str = "auto",
        is_main_process: bool = True,
        allow_empty: bool = False,
        path_initial_model_for_weight_conversion: str | os.PathLike[str] | None = None,
        **_: Any,
    ) -> None:
        """Write each adapter as ``adapter_config.json`` + ``adapter_model.safetensors``.

        ``"default"`` goes into ``save_directory``, other adapters into ``save_directory/<name>``. Each adapter
        folder is replaced as one unit: a save that fails or is killed leaves the previous checkpoint loadable
        (see ``docs/reliability.md``). Under FSDP, call it on every rank with ``is_main_process=(rank == 0)``:
        sharded adapter weights are gathered, then rank 0 writes.

        Args:
            save_embedding_layers: also save the base weights of adapted input/output embeddings;
                ``"auto"`` does so when ``target_modules`` names ``embed_tokens`` or ``lm_head``.
            allow_empty: write an adapter that has no tensors in the model (after ``merge_and_unload`` or
                ``unload``) instead of refusing.
            path_initial_model_for_weight_conversion: the folder where the adapter was saved before training (PiSSA,
                OLoRA): write it as a plain LoRA adapter of twice the rank for the original base model instead.

        Raises:
            AdapterNameError: ``selected_adapters`` names an unknown adapter.
            UsageError: an adapter has no tensors in the model (merged and unloaded?) and not ``allow_empty``.
            SaveError: the folder cannot be written; the previous checkpoint there is unchanged.
        """
        if not isinstance(save_directory, (str, os.PathLike)):
            raise UsageError(f"save_directory must be a path, got {type(save_directory).__name__}")
        save_directory = os.fspath(save_directory)
        names = list(self.peft_config) if selected_adapters is None else name_list(selected_adapters,
                                                                                   "selected_adapters")
        if not names and not allow_empty:
            raise UsageError("the model holds no adapters (delete_adapter() removed the last one), so save_pretrained "
                             f"would write nothing to '{save_directory}'; add or load an adapter first")
        for name in names:
            if name not in self.peft_config:
                raise AdapterNameError(f"no adapter named '{name}' to save; adapters: {sorted(self.peft_config)}")
        for name in names:
            config = self.peft_config[name].copy()
            config.inference_mode = True
            if config.task_type is None:
                base = self.model
                config.auto_mapping = {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
            tensors = adapter_tensors(self.model, name, config, self.prompt_encoder[name]
                                      if name in self.prompt_encoder else None)
            if not tensors and not allow_empty:
                raise UsageError(
                    f"adapter '{name}' has no tensors in the model (after merge_and_unload(), unload() or "
                    "delete_adapter() the model no longer holds it), so the save would write an empty adapter. Save "
                    "before unloading, or pass allow_empty=True if an empty adapter is what you want"
                )
            with_embeddings = save_embedding_layers is True or (
                save_embedding_layers == "auto" and method_for(config).saves_embedding_layers(config)
            )
            if path_initial_model_for_weight_conversion is not None:
                initial_dir = resolve_adapter_dir(os.fspath(path_initial_model_for_weight_conversion), None, None)
                initial_config, initial = read_checkpoint(initial_dir, False)
                config, tensors = method_for(config).convert_from_initial(
                    config, {k: t.detach() for k, t in tensors.items()}, initial_config, _with_prefix(initial),
                    initial_dir)
            if with_embeddings:
                tensors.update(embedding_base_tensors(self.model))
            # Sharded parameters (FSDP2 DTensors) are gathered on every rank, a collective call, before the
            # main process writes: call save_pretrained on all ranks with is_main_process=(rank == 0).
            tensors = full_copies(tensors)  # FSDP2 shards / ZeRO-3 partitions gathered (all ranks take part)
            if not is_main_process:
                continue
            out_dir = save_directory if name == "default" else os.path.join(save_directory, name)
            card = self._card(save_directory, names) if name == "default" else None
            save_adapter_files(out_dir, config, tensors, safe_serialization, card=card)
        if is_main_process and "default" not in names:  # the card still goes to the top folder, as HF peft's does
            card = self._card(save_directory, names)
            if card is not None:
                os.makedirs(save_directory, exist_ok=True)
                save_checkpoint(save_directory, {README_NAME: text_writer(card)})

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        tags: list[str] | None = None,
        selected_adapters: list[str] | None = None,
        safe_serialization: bool = True,
        **_: Any,
    ) -> Any:
        """Upload the adapters to the Hugging Face Hub repo ``repo_id`` (created if needed) in one commit: the
        files ``save_pretrained`` writes, with the repo's model card kept and ``library_name``, the base model and
        ``tags`` merged into it.

        Returns:
            huggingface_hub's ``CommitInfo`` of the commit.

        Raises:
            huggingface_hub's errors (no token, no access, network), unchanged; nothing is changed locally.
        """
        import tempfile

        from huggingface_hub import HfApi, ModelCard
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory(prefix="graftkit-push-") as folder:
            try:  # the card already there is merged into, not replaced
                ModelCard.load(repo_id, token=token).save(os.path.join(folder, README_NAME))
            except (EntryNotFoundError, RepositoryNotFoundError):
                pass
            self.save_pretrained(folder, selected_adapters=selected_adapters, safe_serialization=safe_serialization)
            if tags:
                card = model_card(folder, None, list(tags))
                if card is not None:
                    save_checkpoint(folder, {README_NAME: text_writer(card)})
            return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
                                     commit_message=commit_message or "Upload adapter with graftkit",
                                     commit_description=commit_description)

    def get_layer_status(self) -> list[Any]:
        """Every adapted layer's adapters and state (see :func:`graftkit.get_layer_status`)."""
        from .status import get_layer_status

        return get_layer_status(self)

    def get_model_status(self) -> Any:
        """The model-wide summary of the adapted layers (see :func:`graftkit.get_model_status`)."""
        from .status import get_model_status

        return get_model_status(self)

    def _card(self, directory: str, names: list[str]) -> str | None:
        """README.md for a save of adapters ``names`` into ``directory`` (see :func:`graftkit.io.model_card`)."""
        configs = [self.peft_config[n] for n in names]
        base = next((c.base_model_name_or_path for c in configs if c.base_model_name_or_path), None)
        tags = ([f"base_model:adapter:{base}"] if base else []) + sorted({str(c.peft_type).lower() for c in configs})
        if type(self.model).__module__.startswith("transformers."):
            tags.append("transformers")
        return model_card(directory, base, tags + ["graftkit"])

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        strict: bool = True,
        allow_pickle: bool = False,
        autocast_adapter_dtype: bool = True,
        ignore_mismatched_sizes: bool = False,
        **hub_kwargs: Any,
    ) -> PeftModel:
        """Load a saved adapter onto ``model``.

        Args:
            model_id: a folder written by ``save_pretrained`` (or a Hub id present in the local HF cache).
            is_trainable: load for further training; by default the adapter is frozen.
            config: use this config (a config object or dict) instead of the folder's ``adapter_config.json``.
            strict: missing or unexpected tensor names are errors; ``False`` loads the tensors that match.
            allow_pickle: accept an ``adapter_model.bin`` (read with ``torch.load(weights_only=True)``).
            ignore_mismatched_sizes: tensors whose shape differs from the adapter's are skipped with a warning (the
                adapter keeps its initial values there) instead of refused.

        Raises:
            ConfigError / CheckpointError: bad config, missing or damaged files, mismatched names, shapes or saves.
            UsageError: ``model`` already carries another PeftModel's adapters.
            On any error ``model`` is left exactly as it was.
        """
        check_base_model(model)
        check_adapter_name(adapter_name)
        directory = resolve_adapter_dir(model_id, subfolder, revision, **hub_kwargs)

        def task_class(saved: PeftConfig) -> type[PeftModel]:
            if cls is PeftModel and saved.task_type is not None:
                return TASK_CLASSES.get(TaskType(saved.task_type), PeftModel)
            return cls

        def fits(saved: PeftConfig, meta: dict[str, torch.Tensor]) -> None:  # before any tensor data is read
            saved, meta = method_for(saved).upgrade_checkpoint(model, saved.copy(), _with_prefix(meta), directory)
            _check_header(model, meta, directory)
            prepared = task_class(saved)._prepare_config_for(model, saved)
            _check_shapes_before_building(model, prepared, meta, strict, directory, ignore_mismatched_sizes)

        given = None if config is None else as_config(config)
        config, tensors = read_checkpoint(directory, allow_pickle, given, check_shapes=fits)
        config = config.copy()
        config.inference_mode = not is_trainable
        target_cls = task_class(config)
        tensors = _with_prefix(tensors)
        config, tensors = method_for(config).upgrade_checkpoint(model, config, tensors, directory)
        _check_shapes_before_building(model, target_cls._prepare_config_for(model, config), tensors, strict, directory,
                                      ignore_mismatched_sizes)
        grads = {id(p): p.requires_grad for p in model.parameters()}
        with loading():
            peft_model = target_cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            peft_model._load_tensors(adapter_name, tensors, strict=strict, source=directory,
                                     ignore_mismatched=ignore_mismatched_sizes)
        except BaseException:
            peft_model._remove_modules(adapter_name)  # only what this call built
            for param in model.parameters():
                param.requires_grad_(grads.get(id(param), param.requires_grad))
            raise
        if not is_trainable:
            peft_model.eval()  # for inference, as HF peft: dropout off whatever mode the base was in
        return peft_model

    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str,
        is_trainable: bool = False,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        strict: bool = True,
        allow_pickle: bool = False,
        ignore_mismatched_sizes: bool = False,
        **hub_kwargs: Any,
    ) -> IncompatibleKeys:
        """Load a saved adapter under ``adapter_name``.

        A new name adds the adapter (not activated: use :meth:`set_adapter`). An existing name replaces that
        adapter's weights in place (what resuming a training run needs): the saved config must describe the same
        adapter (method, targets, rank, scaling, ...), and the adapter keeps its activation and trainability.

        Args:
            strict: missing or unexpected tensor names are errors; ``False`` loads the tensors that match.
            ignore_mismatched_sizes: tensors whose shape differs from the adapter's are skipped with a warning.

        Returns:
            ``(missing_keys, unexpected_keys)`` under their in-memory names (``...lora_A.<adapter_name>.weight``), as
            HF peft returns them: the adapter's tensors the file did not hold, and the file's tensors that fit none.

        Raises:
            ConfigError: loading into an existing adapter whose config differs (the fields are named).
            CheckpointError: missing or damaged files, mismatched tensor names or shapes. On any error the model
                is unchanged.
        """
        check_adapter_name(adapter_name)
        directory = resolve_adapter_dir(model_id, subfolder, revision, **hub_kwargs)

        def fits(saved: PeftConfig, meta: dict[str, torch.Tensor]) -> None:
            saved, meta = method_for(saved).upgrade_checkpoint(self.model, saved.copy(), _with_prefix(meta), directory)
            _check_header(self.model, meta, directory)
            if adapter_name in self.peft_config:  # shapes may follow the file's training state (AdaLoRA's ranks)
                self._check_same_adapter(adapter_name, saved, directory)
            else:
                _check_shapes_before_building(self.model, self._prepare_config(saved), meta, strict, directory,
                                              ignore_mismatched_sizes)

        config, tensors = read_checkpoint(directory, allow_pickle, check_shapes=fits)
        config.inference_mode = not is_trainable
        tensors = _with_prefix(tensors)
        config, tensors = method_for(config).upgrade_checkpoint(self.model, config, tensors, directory)
        if adapter_name in self.peft_config:
            self._check_same_adapter(adapter_name, config, directory)
            current = self.peft_config[adapter_name]
            method = method_for(current)
            before = {f: copy.deepcopy(getattr(current, f)) for f in current.training_state_fields}
            try:  # state that training changes (AdaLoRA's kept ranks) comes from the file
                for field in before:
                    setattr(current, field, copy.deepcopy(getattr(config, field)))
                method.restore_state(self.model, current, adapter_name)
                missing, unexpected = self._load_tensors(adapter_name, tensors, strict=strict, source=directory,
                                                         ignore_mismatched=ignore_mismatched_sizes)
            except BaseException:
                for field, value in before.items():
                    setattr(current, field, value)
                method.restore_state(self.model, current, adapter_name)
                raise
            return self._load_result(adapter_name, missing, unexpected)
        _check_shapes_before_building(self.model, self._prepare_config(config), tensors, strict, directory,
                                      ignore_mismatched_sizes)
        with loading():
            self.add_adapter(adapter_name, config)
        try:
            missing, unexpected = self._load_tensors(adapter_name, tensors, strict=strict, source=directory,
                                                     ignore_mismatched=ignore_mismatched_sizes)
        except BaseException:
            self.delete_adapter(adapter_name)
            raise
        if is_trainable:  # trainable even while another adapter is active, as HF peft loads it
            unfreeze_adapter(self.model, self.peft_config[adapter_name], adapter_name, self.prompt_encoder)
        else:
            self.eval()
        return self._load_result(adapter_name, missing, unexpected)

    def _load_result(self, adapter_name: str, missing: list[str], unexpected: list[str]) -> IncompatibleKeys:
        """Saved names of a load's missing and unexpected tensors, as the in-memory names HF peft reports."""
        mapping = saved_to_memory(self, adapter_name)
        return IncompatibleKeys([mapping.get(k, guess_memory_name(self.model, k, adapter_name)) for k in missing],
                                [mapping.get(k, guess_memory_name(self.model, k, adapter_name)) for k in unexpected])

    def _check_same_adapter(self, adapter_name: str, saved: PeftConfig, source: str) -> None:
        def normal(config: PeftConfig) -> dict[str, Any]:  # lists of names compare as sets (files keep no order)
            items = self._prepare_config(config).to_dict().items()
            return {k: sorted(map(str, v)) if isinstance(v, list) else v for k, v in items}

        current, incoming = normal(self.peft_config[adapter_name]), normal(saved)
        skip = saved.bookkeeping_fields | saved.training_state_fields
        differ = sorted(k for k in set(current) | set(incoming) if k not in skip and current.get(k) != incoming.get(k))
        if differ:
            shown = ", ".join(f"{k}: {current.get(k)!r} here, {incoming.get(k)!r} in the file" for k in differ[:5])
            raise ConfigError(
                f"{source}: cannot load into the existing adapter '{adapter_name}': its config differs ({shown}). "
                "Load it under a new adapter_name, or delete_adapter() the old one first"
            )

    def _load_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor], strict: bool, source: str,
                      ignore_mismatched: bool = False) -> tuple[list[str], list[str]]:
        """Copy saved-name ``tensors`` into adapter ``adapter_name``; returns the (missing, unexpected) saved names.

        Raises:
            CheckpointError: names (``strict``) or shapes (unless ``ignore_mismatched``) do not fit; nothing changed.
        """
        expected = self.get_adapter_state_dict(adapter_name)
        optional = embedding_base_tensors(self.model)
        tensors = _with_prefix(tensors)
        if ignore_mismatched:
            skipped = {k: (tuple(v.shape), shape_of(expected.get(k, optional.get(k)))) for k, v in tensors.items()
                       if (k in expected or k in optional)
                       and tuple(v.shape) != shape_of(expected.get(k, optional.get(k)))}
            if skipped:
                warnings.warn(f"{source}: skipped tensors whose shape does not fit the model "
                              f"(ignore_mismatched_sizes=True): " + "; ".join(
                                  f"{k}: {a} in the file, {b} in the model" for k, (a, b) in skipped.items()),
                              PeftWarning, stacklevel=3)
                tensors = {k: v for k, v in tensors.items() if k not in skipped}
                expected = {k: v for k, v in expected.items() if k not in skipped}
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected) - set(optional))
        if strict and (missing or unexpected):
            raise CheckpointError(_fit_message(source, self.model, missing, unexpected))
        if missing or unexpected:
            warnings.warn(f"{source}: loaded non-strictly; missing {missing[:5]}, unexpected {unexpected[:5]}",
                          stacklevel=3)
        for key, src in tensors.items():
            dst = expected.get(key, optional.get(key))
            if dst is None:
                continue
            if shape_of(dst) != tuple(src.shape):
                raise CheckpointError(
                    f"{source}: tensor '{key}' has shape {tuple(src.shape)} in the file but "
                    f"{shape_of(dst)} in the model; check r / rank_pattern and the base model"
                )
        # ZeRO-3 partitions (an adapter built under zero.Init, or one the engine partitioned) are written whole.
        with writable([t for k, t in {**expected, **optional}.items() if k in tensors]):
            model_level = {k: v for k, v in tensors.items() if k in expected and "." not in k}
            if model_level:  # tensors of an adapter that acts on the inputs: it takes them itself
                self.prompt_encoder[adapter_name].load_saved(model_level)
            taken = set(model_level)
            for path, module in wrappers(self.model):  # layer adapters take their tensors themselves
                part = module.adapters[adapter_name] if isinstance(module, AdaptedLayer) and adapter_name in \
                    module.adapters else None
                if part is not None:
                    head = f"{PREFIX}{path}."
                    own = {key: tensors[head + key] for key in part.saved_tensors()
                           if head + key in tensors and head + key in expected}
                    part.load_saved(own)
                    taken.update(head + key for key in own)
            with torch.no_grad():
                for key, src in tensors.items():
                    dst = expected.get(key, optional.get(key))
                    if dst is not None and key not in taken:
                        dst.copy_(src.to(device=dst.device, dtype=dst.dtype))
        return missing, unexpected


def _with_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Writers that drop the wrapper prefix: put it back on module paths (names without a dot, such as
    # ``prompt_embeddings``, are model-level tensors and have none).
    if tensors and not any(k.startswith(PREFIX) for k in tensors):
        return {(PREFIX + k if "." in k else k): v for k, v in tensors.items()}
    return tensors


def _fit_message(source: str, model: nn.Module, missing: list[str], unexpected: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing tensor(s), e.g. {missing[:5]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:5]}")
    return (f"{source}: the adapter does not fit {type(model).__name__}: {'; '.join(parts)}. Was it trained on "
            "another base model or with other target_modules? Pass strict=False to load what matches")


def _check_header(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Bound every tensor a file declares by the model it is for, before any is read: no adapter tensor holds
    more elements than the whole base model (a header declaring a [4, 2**33] tensor over a sparse file would
    otherwise allocate 128 GiB before any shape is compared).

    Raises:
        CheckpointError: a tensor (or all of them together) larger than the model could need.
    """
    total = sum(numel_of(p) for p in model.parameters()) + sum(numel_of(b) for b in model.buffers())
    declared = 0
    for key, tensor in tensors.items():
        declared += tensor.numel()
        if tensor.numel() > total:
            raise CheckpointError(
                f"{source}: tensor '{key}' declares shape {tuple(tensor.shape)} ({tensor.numel():,d} values), more "
                f"than the whole {type(model).__name__} ({total:,d}); the file is damaged or is for another model"
            )
    if declared > 2 * total:
        raise CheckpointError(f"{source}: the file declares {declared:,d} values in all, more than twice the whole "
                              f"{type(model).__name__} ({total:,d}); the file is damaged or is for another model")


def _check_shapes_before_building(model: nn.Module, config: PeftConfig, tensors: dict[str, torch.Tensor],
                                  strict: bool, source: str, ignore_mismatched: bool = False) -> None:
    """Compare the file's tensors with the shapes ``config`` would build on ``model``, before anything sized by
    the config is allocated (a damaged ``r`` must not allocate gigabytes before the shape error).

    Raises:
        CheckpointError: a tensor's shape differs, or (``strict``) an adapter tensor the config implies is missing.
    """
    if not isinstance(config, TunerConfig):
        return
    method = method_for(config)
    implied: list[str] = []
    for path in method.module_targets(model, config):
        module = model.get_submodule(path)
        base = module.base_layer if isinstance(module, AdaptedLayer) else module
        for key, shape in (method.adapter_shapes(base, config, path) or {}).items():
            name = f"{PREFIX}{path}.{key}"
            implied.append(name)
            src = tensors.get(name)
            if src is not None and tuple(src.shape) != tuple(shape) and not ignore_mismatched:
                raise CheckpointError(
                    f"{source}: tensor '{name}' has shape {tuple(src.shape)} in the file, but the config "
                    f"(r / rank_pattern) and the base layer give {tuple(shape)}; the config and weights do not match"
                )
    if strict and implied and not any(name in tensors for name in implied):  # nothing fits: build nothing
        unexpected = sorted(set(tensors) - set(implied))
        raise CheckpointError(_fit_message(source, model, implied, unexpected))


def enable_input_grads(model: nn.Module) -> None:
    """Make the input embeddings' output require grad (the frozen-base gradient-checkpointing fix)."""
    enable = getattr(model, "enable_input_require_grads", None)
    if callable(enable):
        enable()
        return
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None:
        raise GraftkitError(f"cannot find the input embeddings of {type(model).__name__} to enable input gradients")
    embeddings.register_forward_hook(lambda _module, _inputs, output: output.requires_grad_(True))



class PeftModelForCausalLM(PeftModel):
    task_type = TaskType.CAUSAL_LM


class PeftModelForSeq2SeqLM(PeftModel):
    task_type = TaskType.SEQ_2_SEQ_LM


class PeftModelForSequenceClassification(PeftModel):
    task_type = TaskType.SEQ_CLS
    default_modules_to_save: ClassVar[list[str]] = ["classifier", "score"]


class PeftModelForTokenClassification(PeftModel):
    task_type = TaskType.TOKEN_CLS
    default_modules_to_save: ClassVar[list[str]] = ["classifier", "score"]


class PeftModelForQuestionAnswering(PeftModel):
    task_type = TaskType.QUESTION_ANS
    default_modules_to_save: ClassVar[list[str]] = ["qa_outputs"]


class PeftModelForFeatureExtraction(PeftModel):
    task_type = TaskType.FEATURE_EXTRACTION


TASK_CLASSES: dict[TaskType, type[PeftModel]] = {
    cls.task_type: cls
    for cls in (
        PeftModelForCausalLM,
        PeftModelForSeq2SeqLM,
        PeftModelForSequenceClassification,
        PeftModelForTokenClassification,
        PeftModelForQuestionAnswering,
        PeftModelForFeatureExtraction,
    )
}


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    autocast_adapter_dtype: bool = True,
    **_: Any,
) -> PeftModel:
    """Wrap ``model`` with a new adapter; the task class follows ``peft_config.task_type``.

    Raises:
        UsageError: ``model`` already carries another PeftModel's adapters (see :func:`check_base_model`).
        ConfigError / TargetError: a bad config, or targets that match nothing.
    """
    peft_config = as_config(peft_config)
    cls = TASK_CLASSES.get(TaskType(peft_config.task_type), PeftModel) if peft_config.task_type else PeftModel
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)


def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default") -> nn.Module:
    """Add an adapter to ``model`` in place, without a :class:`PeftModel` around it.

    The adapter is active; only its parameters (and ``modules_to_save``) require grad.
    """
    peft_config = as_config(peft_config)
    if not isinstance(peft_config, TunerConfig):
        raise ConfigError(f"{type(peft_config).__name__} cannot be injected into layers")
    if not isinstance(model, nn.Module):
        raise UsageError(f"the model must be a torch nn.Module, got {type(model).__name__}")
    check_adapter_name(adapter_name)
    owner = _OWNERS.get(model)
    if owner is not None and owner() is not None and any(True for _ in wrappers(model)):
        raise UsageError(f"{type(model).__name__} is the base of a PeftModel; injecting another adapter would change "
                         "what that model computes. Use its add_adapter() instead")
    inject(model, peft_config, adapter_name)
    activate(model, [adapter_name])
    mark_trainable(model, {adapter_name: peft_config}, [adapter_name], train=not peft_config.inference_mode)
    return model
