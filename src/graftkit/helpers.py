"""Helpers code written for HF peft imports from ``peft.helpers`` and ``peft``: checking a folder, loading an
adapter's tensors alone, and context managers over a model's adapters.

``graftkit.helpers`` holds the same names, so ``from peft.helpers import rescale_adapter_scale`` becomes
``from graftkit.helpers import rescale_adapter_scale``.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, GraftkitError, UsageError
from .layer import AdaptedLayer

__all__ = ["check_if_peft_model", "disable_input_dtype_casting", "load_peft_weights", "rescale_adapter_scale"]


def check_if_peft_model(model_name_or_path: str | os.PathLike[str]) -> bool:
    """Whether ``model_name_or_path`` (a local folder, or a Hub id in the local cache) holds an adapter config
    graftkit can read."""
    from .config import PeftConfig

    try:
        PeftConfig.from_pretrained(os.fspath(model_name_or_path))
    except (GraftkitError, OSError, ValueError):
        return False
    return True


def load_peft_weights(model_id: str | os.PathLike[str], device: str | torch.device | None = None,
                      key_mapping: dict[str, str] | None = None, **hub_kwargs: Any) -> dict[str, torch.Tensor]:
    """The tensors of an adapter's weights file (names as saved), checked as every graftkit load checks them.

    Args:
        device: where to put them (default: the CPU).
        key_mapping: ``{regex: replacement}`` applied to each name without its ``base_model.model.`` (or
            ``base_model.``) prefix; the first pattern that matches a name is used, as HF peft does.
        hub_kwargs: ``subfolder``, ``revision`` and the Hub cache arguments.

    Raises:
        CheckpointError: no readable weights file, or a name without the ``base_model`` prefix (with
            ``key_mapping``).
    """
    from .io import read_weights, resolve_adapter_dir

    subfolder, revision = hub_kwargs.pop("subfolder", None), hub_kwargs.pop("revision", None)
    directory = resolve_adapter_dir(model_id, subfolder, revision, **hub_kwargs)
    tensors = read_weights(directory, allow_pickle=bool(hub_kwargs.get("allow_pickle", False)))
    if device is not None:
        tensors = {k: v.to(device) for k, v in tensors.items()}
    if not key_mapping:
        return tensors
    out = {}
    for key, value in tensors.items():
        prefix = next((p for p in ("base_model.model.", "base_model.") if key.startswith(p)), None)
        if prefix is None:
            raise CheckpointError(f"{directory}: tensor '{key}' has no 'base_model.' prefix, so key_mapping cannot be "
                                  "applied to it; load it without key_mapping")
        name = key[len(prefix):]
        for pattern, replacement in key_mapping.items():
            renamed, count = re.subn(pattern, replacement, name)
            if count:
                name = renamed
                break
        out[prefix + name] = value
    return out


def _scaled_adapters(model: nn.Module) -> list[tuple[AdaptedLayer, nn.Module]]:
    return [(layer, adapter) for layer in model.modules() if isinstance(layer, AdaptedLayer)
            for adapter in layer.adapters.values() if isinstance(getattr(adapter, "scaling", None), (int, float))]


@contextlib.contextmanager
def rescale_adapter_scale(model: nn.Module, multiplier: float | int) -> Iterator[None]:
    """Within the block, every scaled adapter (LoRA's ``scaling``) counts ``multiplier`` times as much; the scales
    are restored on exit, also after an error. With ``multiplier`` in [0, 1] this interpolates between the base
    model and the adapted one (WiSE-FT). Merged adapters are already folded into the weights and do not change.

    Raises:
        UsageError: ``multiplier`` is not a finite number, or the model has no scaled adapter.
    """
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or multiplier != multiplier \
            or multiplier in (float("inf"), float("-inf")):
        raise UsageError(f"rescale_adapter_scale: multiplier must be a finite number, got {multiplier!r}")
    pairs = _scaled_adapters(model)
    if not pairs:
        raise UsageError("rescale_adapter_scale: the model has no adapter with a scale (LoRA-style) to rescale")
    saved = [adapter.scaling for _, adapter in pairs]
    try:
        for layer, adapter in pairs:
            adapter.scaling = adapter.scaling * multiplier
            layer._stacks.clear()  # mixed batches cache scaled weights
        yield
    finally:
        for (layer, adapter), scaling in zip(pairs, saved, strict=True):
            adapter.scaling = scaling
            layer._stacks.clear()


@contextlib.contextmanager
def disable_input_dtype_casting(model: nn.Module, active: bool = True) -> Iterator[None]:
    """HF peft casts a layer's input to its adapter weights' dtype, and this turns that off. graftkit computes
    every adapter in the activation dtype and never casts the input, so there is nothing to turn off: the block
    runs as it would outside (kept so that code written for HF peft runs unchanged)."""
    yield
