"""The one layer wrapper every layer-wrapping method uses, and the full-copy wrapper of ``modules_to_save``.

::

    x ──► base_layer ──► y ──► adapter "a" ──► adapter "b" ──► out
    └──────────────────────────────┴────────────────┘
                 (each active adapter sees x and the running output)

``AdaptedLayer`` calls ``base_layer`` exactly as the model would have (so a quantized base costs nothing
here) and lets every active, unmerged adapter update the output. Merging asks each adapter to fold
itself into the dense base weight (see ``weights.py``); unmerging undoes it in reverse order.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .errors import AdapterNameError, GraftkitError
from .weights import get_weight, set_weight


class AdaptedLayer(nn.Module):
    """Wraps ``base_layer`` and holds its adapters by name.

    Attributes:
        base_layer: the original module, called unchanged.
        adapters: adapter name -> adapter module (``adapter(x, y, base_layer) -> y'``).
        active: names of the adapters applied in forward, in order.
        merged: names of the adapters currently folded into the base weight, in merge order.
        disabled: when set, forward is the base layer alone.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False

    def __getattr__(self, name: str) -> Any:
        # Model code reads attributes of the layer it built (``.weight``, ``.in_features`` ...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self._modules["base_layer"], name)

    # ------------------------------------------------------------------ adapters
    def add(self, name: str, adapter: nn.Module) -> None:
        if name in self.adapters:
            raise AdapterNameError(f"adapter '{name}' already exists on this layer; pick another name")
        self.adapters[name] = adapter

    def remove(self, name: str) -> None:
        if name in self.merged:
            self.unmerge()
        del self.adapters[name]
        self.active = [n for n in self.active if n != name]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        y = self.base_layer(x, *args, **kwargs)
        adapters = self.adapters
        for name in self.active:
            if name in adapters and name not in self.merged:
                y = adapters[name](x, y, self.base_layer)
        return y

    # ------------------------------------------------------------------ merge
    def merge(self, names: Iterable[str] | None = None, safe_merge: bool = False, module_name: str = "") -> None:
        """Fold adapters (default: the active ones) into the base weight.

        Raises:
            GraftkitError: with ``safe_merge``, when the merged weight would hold NaN or Inf; nothing changes.
        """
        todo = [n for n in (self.active if names is None else names) if n in self.adapters and n not in self.merged]
        if not todo:
            return
        weight = get_weight(self.base_layer)
        merged = weight
        for name in todo:
            merged = self.adapters[name].merge(merged, self.base_layer)
        if safe_merge and not torch.isfinite(merged).all():
            raise GraftkitError(
                f"merging adapter(s) {todo} into '{module_name or type(self.base_layer).__name__}' gives NaN/Inf; "
                "the model was left unchanged. Check the adapter weights before merging."
            )
        set_weight(self.base_layer, merged)
        self.merged.extend(todo)

    def unmerge(self) -> None:
        """Take every merged adapter back out of the base weight (last merged first)."""
        if not self.merged:
            return
        weight = get_weight(self.base_layer)
        for name in reversed(self.merged):
            weight = self.adapters[name].unmerge(weight, self.base_layer)
        set_weight(self.base_layer, weight)
        self.merged = []


class ModulesToSave(nn.Module):
    """A module trained in full: one trainable copy per adapter, the original kept frozen.

    Forward runs the active adapter's copy, or the original when no copy is active or adapters are disabled.
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self._modules["original_module"], name)

    def add(self, name: str) -> None:
        if name in self.modules_to_save:
            return
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def remove(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active == name:
            self.active = None

    def current(self) -> nn.Module:
        if self.disabled or self.active is None or self.active not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.current()(*args, **kwargs)
