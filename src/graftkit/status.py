"""``get_layer_status`` / ``get_model_status``: what every adapted layer holds (adapters, which are active, merged,
trainable, on which devices) and the model-wide summary, with HF peft's fields and meanings.

A field that differs between layers, where it should not, reads ``"irregular"``: the model is in an inconsistent
state (a layer unmerged by hand, a parameter frozen by hand) and the summary says so instead of picking one layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from torch import nn

from .errors import UsageError
from .layer import AdaptedLayer, ModulesToSave
from .weights import is_quantized

__all__ = ["TunerLayerStatus", "TunerModelStatus", "get_layer_status", "get_model_status"]

Irregular = Literal["irregular"]


@dataclasses.dataclass
class TunerLayerStatus:
    """One adapted layer (or saved module): its path below ``PeftModel.base_model``, kind, adapters and state."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None = None


@dataclasses.dataclass
class TunerModelStatus:
    """The model-wide summary of :class:`TunerLayerStatus` (see the module docstring for ``"irregular"``)."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular = None


def _all_or_none(values: list[bool]) -> bool | Irregular:
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _backend(layer: nn.Module) -> str | None:
    if not is_quantized(layer):
        return None
    name = type(layer).__name__
    return "bnb 4bit" if "4bit" in name else "bnb 8bit" if "8bit" in name else name


def _root(model: nn.Module) -> tuple[nn.Module, dict[str, Any] | None]:
    """The module whose paths name the layers (``PeftModel.base_model``, as HF peft names them), and the adapter
    configs when ``model`` is a graftkit model."""
    configs = getattr(model, "peft_config", None)
    base = getattr(model, "base_model", None)
    if isinstance(configs, dict) and isinstance(base, nn.Module):
        return base, configs
    return model, None


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The status of every adapted layer and saved module of ``model`` (a PeftModel, or a model adapters were
    injected into), in model order.

    Raises:
        UsageError: ``model`` holds no adapter layers.
    """
    root, configs = _root(model)
    told = list(model.active_adapters) if configs is not None else None  # what set_adapter told every layer
    out = []
    for name, module in root.named_modules():
        if isinstance(module, AdaptedLayer):
            adapters = dict(module.adapters.items())
            base, active, merged = module.base_layer, list(module.active), list(module.merged_adapters)
            enabled = not module.disabled
        elif isinstance(module, ModulesToSave):  # active: the told adapters that have a copy here
            adapters = dict(module.modules_to_save.items())
            base, merged, enabled = module.original_module, [], not module.disabled
            active = [module.active] if module.active is not None else []
            if told is not None:
                active = [n for n in told if n in adapters]
        else:
            continue
        kind = "modules_to_save"
        if isinstance(module, AdaptedLayer) and configs is not None:
            types = {str(getattr(configs[n], "peft_type", "")).rpartition(".")[-1].lower() for n in adapters
                     if n in configs}
            kind = "/".join(sorted(types)) or "adapter"
        elif isinstance(module, AdaptedLayer):
            kind = "adapter"
        params = {n: list(adapter.parameters()) for n, adapter in adapters.items()}
        out.append(TunerLayerStatus(
            name=name,
            module_type=f"{kind}.{type(base).__name__}",
            enabled=enabled,
            active_adapters=told if told is not None and isinstance(module, AdaptedLayer) else active,
            merged_adapters=merged,
            requires_grad={n: _all_or_none([p.requires_grad for p in ps]) for n, ps in params.items() if ps},
            available_adapters=sorted(adapters),
            devices={n: sorted({p.device.type for p in ps}) for n, ps in params.items() if ps},
            quantization_backend=_backend(base),
        ))
    if not out:
        raise UsageError(f"{type(model).__name__} holds no adapter layers; get_layer_status() reports on a PeftModel "
                         "or a model adapters were injected into")
    return out


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The model-wide summary of :func:`get_layer_status`.

    Raises:
        UsageError: ``model`` holds no adapter layers (prompt methods act on the model's inputs and have none).
    """
    root, configs = _root(model)
    if configs is not None and not any(isinstance(m, (AdaptedLayer, ModulesToSave)) for m in root.modules()):
        raise UsageError(f"get_model_status() reports on adapter layers; the adapters {sorted(configs)} of this model "
                         "act on its inputs (prompt methods) and have none")
    layers = get_layer_status(model)
    if configs is not None:
        base_type = type(model.get_base_model()).__name__
        first = next(iter(configs.values()))
        adapter_type = type(first).__name__.removesuffix("Config") + "Model"
        peft_types = {n: str(c.peft_type).rpartition(".")[-1] for n, c in configs.items()}
        trainable, total = model.get_nb_trainable_parameters()
    else:
        base_type = type(model).__name__ if hasattr(model, "config") else "other"
        adapter_type, peft_types = "None", {}
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    enabled = {s.enabled for s in layers}
    actives = {tuple(s.active_adapters) for s in layers}
    available = sorted(set().union(*(s.available_adapters for s in layers)))
    merged_all = set().union(*(s.merged_adapters for s in layers))
    merged: list[str] | Irregular = sorted(merged_all)
    if any((set(s.available_adapters) - set(s.merged_adapters)) & merged_all for s in layers):
        merged = "irregular"  # some layer holds an adapter unmerged that another has merged
    grads: dict[str, list[Any]] = {}
    devices: dict[str, set[str]] = {}
    for status in layers:
        for n, value in status.requires_grad.items():
            grads.setdefault(n, []).append(value)
        for n, kinds in status.devices.items():
            devices.setdefault(n, set()).update(kinds)
    backends = {s.quantization_backend for s in layers}
    return TunerModelStatus(
        base_model_type=base_type,
        adapter_model_type=adapter_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(actives.pop()) if len(actives) == 1 else [] if not actives else "irregular",
        merged_adapters=merged,
        requires_grad={n: _all_or_none(v) for n, v in grads.items()},
        available_adapters=available,
        devices={n: sorted(k) for n, k in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular",
    )
