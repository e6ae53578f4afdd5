"""The one layer wrapper every layer-wrapping method uses, and the full-copy wrapper of ``modules_to_save``.

::

    x ──► base_layer ──► y ──► adapter "a" ──► adapter "b" ──► out
    └──────────────────────────────┴────────────────┘
                 (each active adapter sees x and the running output)

``AdaptedLayer`` calls ``base_layer`` exactly as the model would have (so a quantized base costs nothing
here) and lets every active, unmerged adapter update the output. Merging asks each adapter to fold
itself into the dense base weight (see ``weights.py``); unmerging undoes it in reverse order.

The adapter protocol (every method meets the first line; the rest is optional):

* ``adapter(x, y, base_layer) -> y'``, ``merge(w, base_layer) -> w'``, ``unmerge(w', base_layer) -> w``;
* ``transform_input(x) -> x'``: the adapter also changes the layer's input before the base layer runs
  (IA3 on feed-forward layers scales it); ``merge_bias(b)`` / ``unmerge_bias(b)``: merging changes the base bias too;
* ``fused_forward(x, base_layer)`` and ``mixed_forward(...)``: faster paths for one adapter / mixed batches;
* ``saved_tensors()`` / ``load_saved(tensors)``: the adapter saves other tensors than its ``state_dict``
  (AdaLoRA saves only the ranks it kept);
* ``frozen_parameters``: names of the adapter's parameters that stay frozen when it trains (MiCA's B);
* ``restore_base(w, base_layer) -> w``: the adapter changed the base weight when attached (PiSSA, OLoRA) and gives
  it back when it leaves unmerged;
* ``substitute(base_layer, params) -> params`` / ``merge_params(base_layer, sign)``: the adapter replaces some of the
  base's parameters for its forward (run with ``torch.func.functional_call``) and merges into them itself
  (``nn.MultiheadAttention``, whose projections have no forward of their own).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .errors import AdapterNameError, GraftkitError, UnsupportedError, UsageError
from .weights import get_weight, set_weight

BASE = "__base__"  # the adapter name that means "no adapter" in a mixed batch


def check_adapter_name(name: object) -> None:
    """Refuse names that cannot be a module key or a folder name inside a save folder.

    Raises:
        AdapterNameError: ``name`` is not a non-empty string, holds ``.``, ``/``, ``\\`` or a NUL, or is reserved.
    """
    if not isinstance(name, str):
        raise AdapterNameError(f"an adapter name must be a string, got {type(name).__name__} {name!r:.40}")
    bad = [c for c in (".", "/", "\\", "\0") if c in name]
    if not name.strip() or bad or name == BASE:
        why = ("it is empty" if not name.strip() else f"it holds {bad[0]!r}" if bad
               else "it is reserved (it means 'no adapter' in mixed batches)")
        raise AdapterNameError(
            f"adapter name {name!r} cannot be used: {why}. Adapter names become module keys and folder names on "
            "save; use letters, digits, '-' and '_' (e.g. 'task_a')"
        )


class Routing:
    """Which adapter each row of a mixed batch uses, grouped once per forward.

    Attributes:
        unique: the distinct adapter names, in first-seen order (``"__base__"`` included when used).
        index: (B,) long tensor; row i uses ``unique[index[i]]``.
        groups: (name, rows) for each distinct name, rows as a long tensor of row indices.
    """

    def __init__(self, names: list[str], device: torch.device | str | None = None) -> None:
        self.names = list(names)
        self.unique = list(dict.fromkeys(self.names))
        position = {name: i for i, name in enumerate(self.unique)}
        self.index = torch.tensor([position[n] for n in self.names], dtype=torch.long, device=device)
        self.groups = [(name, (self.index == i).nonzero().flatten()) for i, name in enumerate(self.unique)]
        self._expanded: dict[int, Routing] = {}

    def for_batch(self, batch: int) -> Routing:
        """The routing for a batch that repeats each row k times in place (beam search, num_return_sequences)."""
        if batch == len(self.names):
            return self
        if batch % len(self.names):
            raise GraftkitError(
                f"adapter_names has {len(self.names)} entries but a layer got a batch of {batch} rows; "
                "pass one adapter name per input row"
            )
        if batch not in self._expanded:
            factor = batch // len(self.names)
            names = [n for n in self.names for _ in range(factor)]
            self._expanded[batch] = Routing(names, self.index.device)
        return self._expanded[batch]


def grouped_forward(routing: Routing, x: torch.Tensor, y: torch.Tensor, run) -> torch.Tensor:
    """Apply ``run(name, x_rows, y_rows) -> y_rows'`` to each group of rows; rows whose name gives ``None`` keep y.

    Each group is computed on its own sub-batch (gathered once), never on the full batch under a mask.
    """
    out = y
    for name, rows in routing.groups:
        if rows.numel() == len(routing.names):  # the whole batch uses one adapter: no gather/scatter
            part = run(name, x, y)
            out = y if part is None else part
            continue
        part = run(name, x.index_select(0, rows), y.index_select(0, rows))
        if part is not None:
            out = out.index_copy(0, rows, part)
    return out


class AdaptedLayer(nn.Module):
    """Wraps ``base_layer`` and holds its adapters by name.

    Attributes:
        base_layer: the original module, called unchanged.
        adapters: adapter name -> adapter module (``adapter(x, y, base_layer) -> y'``; ``merge(w, base_layer)`` and
            ``unmerge(w, base_layer)`` may update the dense weight ``w`` in place and return it).
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
        self.routing: Routing | None = None  # set by PeftModel for the duration of a mixed-batch call
        self._stacks: dict[Any, Any] = {}  # cache of stacked adapter weights for mixed batches
        self._input_adapters: frozenset[str] = frozenset()  # names of adapters with ``transform_input``
        self._param_adapters: frozenset[str] = frozenset()  # names of adapters with ``substitute``

    def __getattr__(self, name: str) -> Any:
        # Model code reads attributes of the layer it built (``.weight``, ``.in_features`` ...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")  # absent before __init__
            if name == "base_layer" or modules is None or "base_layer" not in modules:
                raise
            return getattr(modules["base_layer"], name)

    # ------------------------------------------------------------------ adapters
    def add(self, name: str, adapter: nn.Module) -> None:
        if name in self.adapters:
            raise AdapterNameError(f"adapter '{name}' already exists on this layer; pick another name")
        self.adapters[name] = adapter
        self._stacks.clear()
        if hasattr(adapter, "transform_input"):
            self._input_adapters = self._input_adapters | {name}
        if hasattr(adapter, "substitute"):
            self._param_adapters = self._param_adapters | {name}

    def remove(self, name: str) -> None:
        if name in self.merged:
            self.unmerge()
        self.release(name)
        del self.adapters[name]
        self.active = [n for n in self.active if n != name]
        self._stacks.clear()
        self._input_adapters = self._input_adapters - {name}
        self._param_adapters = self._param_adapters - {name}

    def release(self, name: str) -> None:
        """The unmerged adapter ``name`` leaves: it gives back what it took from the base weight at attach
        (``restore_base``: PiSSA/OLoRA's principal part), so the base is the original again."""
        restore = getattr(self.adapters[name], "restore_base", None)
        if restore is not None and name not in self.merged:
            set_weight(self.base_layer, restore(get_weight(self.base_layer), self.base_layer))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Submodules are read from ``_modules`` directly: this runs once per adapted layer per decode step, and
        # attribute access on a module goes through ``__getattr__`` (twice, with the fallback above).
        base = self._modules["base_layer"]
        if self.disabled:
            if self.merged:
                self.unmerge()
            return base(x, *args, **kwargs)
        adapters = self._modules["adapters"]._modules
        if self._param_adapters:
            y = self._substituted_forward(x, args, kwargs, adapters)
            if self.routing is not None:
                return y  # each row's adapter already took part
        elif self._input_adapters:
            y = base(self._transform_input(x, adapters), *args, **kwargs)
        else:
            if self.routing is None and not self.merged and len(self.active) == 1 and not args and not kwargs:
                # One adapter on the layer: let it compute base + update in one fused step where it can.
                adapter = adapters.get(self.active[0])
                fused = getattr(adapter, "fused_forward", None) if adapter is not None else None
                y = fused(x, base) if fused is not None else None
                if y is not None:
                    return y
            y = base(x, *args, **kwargs)
        if self.routing is not None:
            return self._mixed_forward(x, y)
        for name in self.active:
            if name in adapters and name not in self.merged:
                y = adapters[name](x, y, base)
        return y

    def _substituted_forward(self, x: Any, args: tuple, kwargs: dict, adapters: dict[str, nn.Module]) -> Any:
        """The base layer run with some of its parameters replaced by the active adapters (``substitute``: layers
        whose weights are not used through a forward of their own, like ``nn.MultiheadAttention``'s projections).

        An adapter kind may run such a layer itself (``routed_forward``, e.g. fused experts at a cost that follows
        the tokens): with one live adapter, or per row in a mixed batch."""
        if self.routing is not None:
            routing = self.routing.for_batch(x.shape[0]) if isinstance(x, torch.Tensor) else None
            per_name = [] if routing is None else [adapters.get(n) for n in routing.unique]
            present = [a for a in per_name if a is not None]
            routed = getattr(type(present[0]), "routed_forward", None) if present else None
            y = None
            if routed is not None and all(type(a) is type(present[0]) for a in present):
                y = routed(per_name, routing.index, x, args, kwargs, self.base_layer)
            if y is None:
                kind = type(self.base_layer).__name__
                raise UsageError(f"mixed-adapter batches (adapter_names) cannot run through {kind}, whose adapters "
                                 "replace its weights; run one adapter per call")
            return y
        live = [n for n in self.active if n in self._param_adapters and n not in self.merged]
        if len(live) == 1:
            routed = getattr(type(adapters[live[0]]), "routed_forward", None)
            y = None if routed is None else routed([adapters[live[0]]], None, x, args, kwargs, self.base_layer)
            if y is not None:
                return y
        params: dict[str, torch.Tensor] = {}
        for name in self.active:
            if name in self._param_adapters and name not in self.merged:
                params = adapters[name].substitute(self.base_layer, params)
        base = self._modules["base_layer"]
        if not params:
            return base(x, *args, **kwargs)
        return torch.func.functional_call(base, params, (x, *args), kwargs)

    def _transform_input(self, x: torch.Tensor, adapters: dict[str, nn.Module]) -> torch.Tensor:
        """The base layer's input after the active adapters that change it (per row in a mixed batch)."""
        if self.routing is not None:
            def run(name: str, xs: torch.Tensor, _: torch.Tensor) -> torch.Tensor | None:
                return adapters[name].transform_input(xs) if name in self._input_adapters else None

            return grouped_forward(self.routing.for_batch(x.shape[0]), x, x, run)
        for name in self.active:
            if name in self._input_adapters and name not in self.merged:
                x = adapters[name].transform_input(x)
        return x

    def _mixed_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each row gets its own adapter (``self.routing``); rows of ``"__base__"`` get none."""
        routing = self.routing.for_batch(x.shape[0])
        per_name = [self.adapters[n] if n in self.adapters else None for n in routing.unique]
        present = [a for a in per_name if a is not None]
        if not present:
            return y
        # One batched call when the adapter kind offers it (LoRA on linear layers: gathered bmm).
        batched = getattr(type(present[0]), "mixed_forward", None)
        if batched is not None and all(type(a) is type(present[0]) for a in present):
            out = batched(per_name, routing.index, x, y, self.base_layer, self._stacks)
            if out is not None:
                return out

        def run(name: str, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor | None:
            return self.adapters[name](xs, ys, self.base_layer) if name in self.adapters else None

        return grouped_forward(routing, x, y, run)

    # ------------------------------------------------------------------ merge
    def _to_merge(self, names: Iterable[str] | None) -> list[str]:
        return [n for n in (self.active if names is None else names) if n in self.adapters and n not in self.merged]

    def check_merge(self, names: Iterable[str] | None = None, module_name: str = "") -> None:
        """Compute the merged weight on a copy and refuse NaN/Inf in it; changes nothing.

        Raises:
            UsageError: the merged weight would hold NaN or Inf (non-finite adapter values, or an overflow of the
                base dtype).
        """
        todo = self._to_merge(names)
        if not todo:
            return
        if self._merges_params(todo):
            params: dict[str, torch.Tensor] = {}
            with torch.no_grad():
                for name in todo:
                    params = self.adapters[name].substitute(self.base_layer, params)
            if not all(bool(torch.isfinite(p).all()) for p in params.values()):
                raise UsageError(f"merging adapter(s) {todo} into '{module_name or type(self.base_layer).__name__}' "
                                 "would write NaN/Inf into the base weights; nothing was merged")
            return
        merged = get_weight(self.base_layer).clone()
        bias = self._bias()
        bias = None if bias is None else bias.detach().clone()
        for name in todo:
            merged = self.adapters[name].merge(merged, self.base_layer)
            if bias is not None and hasattr(self.adapters[name], "merge_bias"):
                bias = self.adapters[name].merge_bias(bias)
        if not bool(torch.isfinite(merged).all()) or (bias is not None and not bool(torch.isfinite(bias).all())):
            raise UsageError(
                f"merging adapter(s) {todo} into '{module_name or type(self.base_layer).__name__}' would write NaN/Inf "
                "into the base weights; nothing was merged. Check the adapter weights (or the base dtype's range), "
                "or pass allow_non_finite=True to merge anyway"
            )

    def merge(self, names: Iterable[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weight; :meth:`check_merge` first refuses
        NaN/Inf results."""
        todo = self._to_merge(names)
        if not todo:
            return
        if self._merges_params(todo):
            for name in todo:
                self.adapters[name].merge_params(self.base_layer, 1.0)
            self.merged.extend(todo)
            return
        merged = get_weight(self.base_layer)  # plain layers: the live weight, which adapters update in place
        bias = self._bias()
        for name in todo:
            merged = self.adapters[name].merge(merged, self.base_layer)
            if bias is not None and hasattr(self.adapters[name], "merge_bias"):
                with torch.no_grad():
                    bias.copy_(self.adapters[name].merge_bias(bias.detach().clone()))
        set_weight(self.base_layer, merged)
        self.merged.extend(todo)

    def unmerge(self) -> None:
        """Take every merged adapter back out of the base weight (last merged first)."""
        if not self.merged:
            return
        if self._merges_params(self.merged):
            for name in reversed(self.merged):
                self.adapters[name].merge_params(self.base_layer, -1.0)
            self.merged = []
            return
        weight = get_weight(self.base_layer)
        bias = self._bias()
        for name in reversed(self.merged):
            weight = self.adapters[name].unmerge(weight, self.base_layer)
            if bias is not None and hasattr(self.adapters[name], "unmerge_bias"):
                with torch.no_grad():
                    bias.copy_(self.adapters[name].unmerge_bias(bias.detach().clone()))
        set_weight(self.base_layer, weight)
        self.merged = []

    def _merges_params(self, names: list[str]) -> bool:
        """Whether these adapters merge by writing the base's parameters themselves (``merge_params``), not
        through the dense-weight access of ``weights.py``; a layer's adapters do one or the other."""
        kinds = {hasattr(self.adapters[n], "merge_params") for n in names}
        if len(kinds) > 1:
            raise UsageError(f"adapters {names} on {type(self.base_layer).__name__} merge in different ways; merge "
                             "them one at a time")
        return kinds == {True}

    def _bias(self) -> torch.Tensor | None:
        bias = getattr(self.base_layer, "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None


class ModelAdapter(nn.Module):
    """An adapter that changes what the base model receives instead of wrapping its layers (prompt methods).

    The model wrapper calls the active one around the base model; every hook has a do-nothing default, so a
    method implements only what it changes. Its parameters are trained and saved like any adapter's.
    """

    live = False  # set by the model wrapper before each forward: this adapter is the one that applies

    def detach(self) -> None:
        """Remove whatever the adapter installed inside the model (hooks); called when it is deleted or unloaded."""

    def prepare(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments of the base model's forward, changed (inputs, attention mask, labels, cache)."""
        return inputs

    def generate(self, model: nn.Module, inputs: dict[str, Any]) -> Any:
        """Run ``model.generate(**inputs)`` with the adapter applied; returns what ``generate`` returns."""
        return model.generate(**inputs)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to save under their on-disk names (their shapes are what loading expects)."""
        return {}

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take saved tensors (names and shapes already checked); by default copies into :meth:`saved_tensors`."""
        copy_saved(self.saved_tensors(), tensors)


def copy_saved(live: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors into the live tensors of the same names (device and dtype follow the live ones)."""
    with torch.no_grad():
        for key, src in tensors.items():
            live[key].copy_(src.to(device=live[key].device, dtype=live[key].dtype))


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
        self.routing: Routing | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if name in ("original_module", "modules_to_save") or modules is None or "original_module" not in modules:
                raise
            return getattr(modules["original_module"], name)

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
        if self.routing is None or self.disabled:
            return self.current()(*args, **kwargs)
        x, rest = args[0], args[1:]
        if not isinstance(x, torch.Tensor) or kwargs:
            raise GraftkitError(
                f"mixed-adapter batches through a saved module ({type(self.original_module).__name__}) need one "
                "tensor argument; call without adapter_names"
            )
        routing = self.routing.for_batch(x.shape[0])

        def module(name: str) -> nn.Module:
            return self.modules_to_save[name] if name in self.modules_to_save else self.original_module

        if len(routing.unique) == 1:
            return module(routing.unique[0])(x, *rest)
        out = None
        for name, rows in routing.groups:
            part = module(name)(x.index_select(0, rows), *rest)
            if not isinstance(part, torch.Tensor):  # which dimension of each output holds the rows is unknown
                raise UnsupportedError(
                    f"mixed-adapter batches through a saved module ({type(self.original_module).__name__}) that "
                    f"returns a {type(part).__name__} are not supported (its rows cannot be put back in order); "
                    "call without adapter_names, or route the rows to one adapter each call"
                )
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out = out.index_copy(0, rows, part)
        return out
