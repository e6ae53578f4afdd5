"""Picking target modules by name and swapping them for :class:`AdaptedLayer` wrappers.

Matching rules (the ecosystem's):

* a list of names: ``name`` matches the module path ``name`` itself and every path ending in ``.name``;
* one string: a regex that must match the whole module path;
* ``"all-linear"``: every linear layer (``nn.Linear``, transformers ``Conv1D``, quantized linears) except
  the model's output layer;
* ``exclude_modules`` uses the same rules and wins over ``target_modules``;
* ``layers_to_transform`` keeps only modules whose layer index (read as ``<layers_pattern>.<index>.`` in
  the path; by default any ``<name>.<index>.``, the last one) is listed.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

from torch import nn

from .config import ALL_LINEAR
from .errors import TargetError
from .layer import AdaptedLayer, ModulesToSave
from .registry import method_for

if TYPE_CHECKING:
    from .config import TunerConfig



def iter_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` (same order, shared modules once) without descending into graftkit wrappers.

    A pre-order walk that stops at wrappers costs one step per module outside them, however many adapters the
    wrappers hold; filtering ``named_modules`` by prefix would grow with modules x wrappers.
    """
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        if isinstance(module, (AdaptedLayer, ModulesToSave)):
            continue
        children = [(f"{name}.{key}" if name else key, child) for key, child in module._modules.items()]
        stack.extend(reversed([(key, child) for key, child in children if child is not None]))


def _name_matches(name: str, patterns: list[str] | str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The layer index in a module path (``model.layers.3.mlp`` -> 3), or ``None``."""
    patterns = [r"[^.]+"] if layers_pattern is None else (
        [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
    )
    for pattern in patterns:
        found = re.match(rf"(?:.*\.)?(?:{pattern})\.(\d+)\.", name)
        if found:
            return int(found.group(1))
    return None


def is_linear(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a linear layer with a transposed weight.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _output_layer(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def default_targets(model: nn.Module, config: TunerConfig) -> list[str]:
    """The method's default ``target_modules`` for the model's architecture."""
    method = method_for(config)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in method.default_targets:
        return list(method.default_targets[model_type])
    linears = sorted({n.rsplit(".", 1)[-1] for n, m in iter_modules(model) if is_linear(m)})
    raise TargetError(
        f"no default target_modules for model_type={model_type!r} with {method.peft_type}; pass "
        f"target_modules explicitly (names such as {linears[:12]}) or target_modules='{ALL_LINEAR}'"
    )


def find_targets(model: nn.Module, config: TunerConfig) -> list[str]:
    """Module paths that ``config`` selects in ``model``.

    Raises:
        TargetError: nothing matches; the message lists the patterns and module names that do exist.
    """
    targets = config.target_modules if config.target_modules is not None else default_targets(model, config)
    if isinstance(targets, list) and not targets:  # explicitly no module (LoRA's target_parameters only)
        return []
    output_layer = _output_layer(model) if targets == ALL_LINEAR else None
    saved = getattr(config, "modules_to_save", None) or []
    layers = config.layers_to_transform
    if isinstance(layers, int):
        layers = [layers]
    found: list[str] = []
    for name, module in iter_modules(model):
        if not name:
            continue
        if targets == ALL_LINEAR:
            base = module.base_layer if isinstance(module, AdaptedLayer) else module
            if not is_linear(base) or base is output_layer:
                continue
            if saved and _name_matches(name, saved):  # a head trained in full (classifier) gets no adapter too
                continue
        elif not _name_matches(name, targets):
            continue
        if config.exclude_modules is not None and _name_matches(name, config.exclude_modules):
            continue
        if layers is not None and layer_index(name, config.layers_pattern) not in layers:
            continue
        found.append(name)
    if targets == ALL_LINEAR and not getattr(config, "target_parameters", None):
        _warn_unadapted_experts(model)
    if not found:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in iter_modules(model) if n and not list(m.children())})
        detail = f", layers_to_transform={config.layers_to_transform!r}" if layers is not None else ""
        raise TargetError(
            f"target_modules={targets!r} (exclude_modules={config.exclude_modules!r}{detail}) matched no module of "
            f"{type(model).__name__}. Leaf modules that exist: {leaves[:40]}. Pass names from that list."
        )
    return found


def _warn_unadapted_experts(model: nn.Module) -> None:
    """Mixture-of-experts models in transformers 5 keep their experts as fused 3-D parameters, not linear layers:
    say so instead of silently leaving most of the model's weights out of ``"all-linear"``."""
    experts = [name for name, module in iter_modules(model)
               if any(p is not None and p.dim() == 3 for p in module._parameters.values())]
    if experts:
        warnings.warn(
            f"target_modules='{ALL_LINEAR}' adapts linear layers only: the fused expert parameters of {experts[:3]}"
            f"{' ...' if len(experts) > 3 else ''} ({len(experts)} modules) stay frozen; name them in "
            "target_parameters (e.g. ['experts.gate_up_proj', 'experts.down_proj']) to adapt them",
            stacklevel=4,
        )


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(model: nn.Module, config: TunerConfig, adapter_name: str) -> list[str]:
    """Attach adapter ``adapter_name`` to every module ``config`` targets, and add its ``modules_to_save``.

    Returns:
        The module paths that received an adapter.

    Raises:
        TargetError: nothing matched, or a matched module is of a kind the method cannot adapt.
    """
    method = method_for(config)
    targets = find_targets(model, config)
    if not targets:
        raise TargetError("target_modules=[] selects no module to adapt; name modules (or, with LoRA, parameters in "
                          "target_parameters)")
    both = [n for n in targets if config.modules_to_save and _name_matches(n, config.modules_to_save)]
    if both:
        raise TargetError(
            f"{both[:3]} are both adapter targets and modules_to_save (trained in full); a module is one or the "
            "other: remove it from target_modules or from modules_to_save"
        )
    for name in targets:
        module = model.get_submodule(name)
        base = module.base_layer if isinstance(module, AdaptedLayer) else module
        adapter = method.create_adapter(base, config, name)
        if adapter is None:
            raise TargetError(
                f"module '{name}' is a {type(base).__name__}, which {method.peft_type} cannot adapt "
                f"(supported: {method.supported_layers()}); narrow target_modules or add it to exclude_modules"
            )
        if not isinstance(module, AdaptedLayer):
            module = AdaptedLayer(base)
            set_submodule(model, name, module)
        module.add(adapter_name, adapter)
    add_modules_to_save(model, config.modules_to_save, adapter_name)
    return targets


def add_modules_to_save(model: nn.Module, names: list[str] | None, adapter_name: str) -> None:
    """Give adapter ``adapter_name`` its own trainable copy of each module ``names`` selects."""
    for name in find_modules_to_save(model, names):
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            set_submodule(model, name, module)
        module.add(adapter_name)


def find_modules_to_save(model: nn.Module, names: list[str] | None) -> list[str]:
    if not names:
        return []
    return [n for n, _ in iter_modules(model) if n and _name_matches(n, names)]
