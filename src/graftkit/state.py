"""State dicts in the ecosystem's three spellings, and the functions that move between them.

* in memory: ``model.state_dict()`` of a :class:`PeftModel` (``...q_proj.lora_A.default.weight``,
  ``...q_proj.base_layer.weight``), what FSDP/DeepSpeed full-state checkpoints hold;
* saved: an adapter's tensors as ``adapter_model.safetensors`` holds them (``...q_proj.lora_A.weight``: no adapter
  name), what :func:`get_peft_model_state_dict` returns and :func:`set_peft_model_state_dict` takes;
* the base model's own: the keys of the model before it was wrapped (``model.layers.0.self_attn.q_proj.weight``),
  what :func:`get_base_model_state_dict` returns and :func:`set_base_model_state_dict` takes.

Saved and in-memory names are paired by the tensors themselves (the saved tensor *is* the live one), never by
rewriting strings, so every method and layer kind maps the same way.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, PeftWarning, UsageError
from .layer import AdaptedLayer, ModulesToSave
from .model import (
    IncompatibleKeys,
    PeftModel,
    _with_prefix,
    embedding_base_tensors,
    guess_memory_name,
    memory_names,
    saved_to_memory,
)
from .registry import method_for
from .weights import full_copies, shape_of

# peft's name for the pair ``load_state_dict`` returns; graftkit's ``load_adapter`` returns the same.
__all__ = ["IncompatibleKeys", "StateDictError", "get_base_model_state_dict", "get_peft_model_state_dict",
           "set_base_model_state_dict", "set_peft_model_state_dict"]


class StateDictError(CheckpointError, RuntimeError):
    """A state dict does not fit the model (a ``RuntimeError`` too, as ``load_state_dict`` raises)."""


def _peft_model(model: Any, what: str) -> PeftModel:
    if not isinstance(model, PeftModel):
        raise UsageError(f"{what} takes a PeftModel (from get_peft_model or PeftModel.from_pretrained), got "
                         f"{type(model).__name__}")
    return model


def get_peft_model_state_dict(model: Any, state_dict: dict[str, torch.Tensor] | None = None,
                              adapter_name: str = "default", unwrap_compiled: bool = False,
                              save_embedding_layers: bool | str = "auto") -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name``'s tensors under their saved names (what ``save_pretrained`` writes).

    Args:
        model: the :class:`PeftModel`.
        state_dict: take the values from this in-memory state dict instead of the live model (a full state dict that
            FSDP or DeepSpeed gathered); keys it lacks come from the model.
        adapter_name: which adapter.
        unwrap_compiled: accepted for the ecosystem's signature (a compiled model is unwrapped either way).
        save_embedding_layers: also return the base weights of adapted input/output embeddings (``"auto"``: when the
            config targets ``embed_tokens`` or ``lm_head``), as ``save_pretrained`` does.

    Under DeepSpeed ZeRO-3 the tensors come back whole: every rank must call it (it gathers the partitions), as
    every rank calls ``save_pretrained``.

    Raises:
        UsageError: ``model`` is not a PeftModel. AdapterNameError: no adapter ``adapter_name``.
    """
    model = _peft_model(getattr(model, "_orig_mod", model), "get_peft_model_state_dict")
    saved = model.get_adapter_state_dict(adapter_name)
    config = model.peft_config[adapter_name]
    if save_embedding_layers is True or (save_embedding_layers == "auto" and
                                         method_for(config).saves_embedding_layers(config)):
        saved.update(embedding_base_tensors(model.model))
    if state_dict is not None:
        names = memory_names(model)
        given = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}
        saved = {key: given.get(names.get(id(t), ""), t) for key, t in saved.items()}
    return {key: t.detach() for key, t in full_copies(saved).items()}


def set_peft_model_state_dict(model: Any, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default", ignore_mismatched_sizes: bool = False,
                              low_cpu_mem_usage: bool = False) -> IncompatibleKeys:
    """Load saved-name tensors into the existing adapter ``adapter_name``.

    Tensors are copied into the adapter's (their device and dtype are kept); what does not fit is reported, as
    ``nn.Module.load_state_dict(strict=False)`` reports it over the whole model: ``missing_keys`` are the model's
    in-memory keys that received nothing (the base model's included), ``unexpected_keys`` the given tensors that fit
    nowhere, under the in-memory name they would have had.

    Args:
        ignore_mismatched_sizes: skip (with a warning) tensors whose shape differs from the adapter's, instead of
            raising.
        low_cpu_mem_usage: accepted for the ecosystem's signature; graftkit always copies into the built adapter.

    Raises:
        CheckpointError: a tensor's shape differs (and not ``ignore_mismatched_sizes``); nothing was loaded.
        AdapterNameError: no adapter ``adapter_name`` (add it first, e.g. ``add_adapter``).
    """
    model = _peft_model(model, "set_peft_model_state_dict")
    tensors = _with_prefix(dict(peft_model_state_dict))
    known = {**embedding_base_tensors(model.model), **model.get_adapter_state_dict(adapter_name)}
    mismatched = {k: (tuple(v.shape), shape_of(known[k])) for k, v in tensors.items()
                  if k in known and tuple(v.shape) != shape_of(known[k])}
    if mismatched and not ignore_mismatched_sizes:
        key, (got, want) = next(iter(mismatched.items()))
        raise StateDictError(f"tensor '{key}' has shape {got} but adapter '{adapter_name}' holds {want} "
                             f"({len(mismatched)} mismatched); nothing was loaded. Check r / rank_pattern, or pass "
                             "ignore_mismatched_sizes=True to skip them")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the keys are reported in the result instead
        model._load_tensors(adapter_name, tensors, strict=False, source="set_peft_model_state_dict",
                            ignore_mismatched=ignore_mismatched_sizes)
    if mismatched:
        warnings.warn("set_peft_model_state_dict skipped tensors whose shape does not fit the model: " + "; ".join(
            f"{k}: {a} given, {b} in the model" for k, (a, b) in mismatched.items()), PeftWarning, stacklevel=2)
    mapping = saved_to_memory(model, adapter_name)
    loaded = {mapping[k] for k in tensors if k in mapping and k not in mismatched}
    missing = [k for k in model.state_dict() if k not in loaded]
    unexpected = [guess_memory_name(model.model, k, adapter_name) for k in tensors if k not in known]
    return IncompatibleKeys(missing, unexpected)


def _base_names(module: nn.Module, memory: str = "", original: str = "", out: dict[str, str] | None = None
                ) -> dict[str, str]:
    """In-memory key -> the key the model had before it was wrapped, for every base tensor (adapters left out)."""
    out = {} if out is None else out
    if isinstance(module, AdaptedLayer):
        return _base_names(module.base_layer, f"{memory}base_layer.", original, out)
    if isinstance(module, ModulesToSave):
        return _base_names(module.original_module, f"{memory}original_module.", original, out)
    for name, tensor in module._parameters.items():
        if tensor is not None:
            out[memory + name] = original + name
    for name, tensor in module._buffers.items():
        if tensor is not None and name not in module._non_persistent_buffers_set:
            out[memory + name] = original + name
    for name, child in module._modules.items():
        if child is not None:
            _base_names(child, f"{memory}{name}.", f"{original}{name}.", out)
    return out


def get_base_model_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The base model's state dict under its own keys (no ``base_layer`` / ``original_module`` infixes, no adapter
    tensors): what the model had before it was wrapped, with the base weights it holds now."""
    model = _peft_model(model, "get_base_model_state_dict")
    names = _base_names(model.model)
    return {names[k]: v for k, v in model.model.state_dict().items() if k in names}


def set_base_model_state_dict(model: Any, state_dict: dict[str, torch.Tensor], strict: bool = True
                              ) -> IncompatibleKeys:
    """Load a state dict keyed by the base model's own names into the wrapped model (adapters untouched).

    Raises:
        StateDictError: ``strict`` and keys are missing or unexpected; nothing was loaded.
    """
    model = _peft_model(model, "set_base_model_state_dict")
    to_memory = {original: memory for memory, original in _base_names(model.model).items()}
    unexpected = [k for k in state_dict if k not in to_memory]
    missing = [k for k in to_memory if k not in state_dict]
    if strict and (missing or unexpected):
        raise StateDictError(f"the base model state dict does not fit {type(model.model).__name__}: "
                             f"missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} "
                             f"({len(unexpected)}); nothing was loaded. Pass strict=False to load what fits")
    model.model.load_state_dict({to_memory[k]: v for k, v in state_dict.items() if k in to_memory}, strict=False)
    return IncompatibleKeys(missing, unexpected)

