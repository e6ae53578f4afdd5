"""The one layer wrapper every layer-wrapping method uses, and the full-copy wrapper of ``modules_to_save``.

::

    x ──► base_layer ──► y ──► adapter "a" ──► adapter "b" ──► out
    └──────────────────────────────┴────────────────┘
                 (each active adapter sees x and the running output)

``AdaptedLayer`` calls ``base_layer`` exactly as the model would have (so a quantized base costs nothing
here) and lets every active, unmerged adapter update the output. Merging asks each adapter to fold
itself into the dense base weight (see ``weights.py``); unmerging undoes it in reverse order.

Every layer adapter is a :class:`LayerAdapter`: it implements ``forward(x, y, base_layer) -> y'``,
``merge(w, base_layer) -> w'`` and ``unmerge(w', base_layer) -> w``; the other hooks (input transforms, faster paths
for one adapter / mixed batches, bias merging, saved tensors, frozen parameters, weight substitution, attach/detach)
have do-nothing defaults there, listed in one place, and the wrapper calls them without probing.

Names in memory: an adapter is written as a plain module (``self.lora_A = nn.Linear(...)``), but the layer registers
what it holds under the attribute first and the adapter name second, as the ecosystem names it::

    q_proj.base_layer.weight
    q_proj.lora_A.default.weight       (adapter "default", its child module lora_A)
    q_proj.ia3_l.default               (an adapter's own parameter ia3_l)

``layer.lora_A["default"]`` is the adapter's ``lora_A``. The adapter objects themselves are not submodules (they are
in ``layer.adapters``); their parameter, buffer and child tables are twinned with the layer's slots (``Slot``), so a
tensor replaced on either side (``.to()``, ``load_state_dict(assign=True)``, FSDP swapping in its own parameters) is
replaced on both.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import nn

from .errors import AdapterNameError, GraftkitError, UnsupportedError, UsageError
from .weights import all_finite, get_weight, set_weight

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


_TABLES = ("_parameters", "_buffers", "_modules")  # a module's tensor and child tables, in registration order


def _raw_put(table: dict, key: str, value: Any) -> None:
    """Write into a twinned table without repeating the write (the twin already has it)."""
    if dict.get(table, key, _MISSING) is not value:
        dict.__setitem__(table, key, value)


_MISSING = object()


def _rebuild(cls: type, items: dict, state: dict) -> dict:
    """Unpickle/deepcopy a twinned table: fill it without repeating writes (the twin is copied on its own)."""
    table = cls()
    dict.update(table, items)
    table.__dict__.update(state)
    return table


class _Twinned(dict):
    """A module table (parameters, buffers or children) whose writes are repeated in its twin table.

    Subclasses say where the twin is: ``_twin()`` returns (table, key) or None.
    """

    kind: str

    def _twin(self, key: str) -> tuple[dict, str] | None:
        raise NotImplementedError

    def __setitem__(self, key: str, value: Any) -> None:
        dict.__setitem__(self, key, value)
        twin = self._twin(key)
        if twin is not None:
            _raw_put(twin[0], twin[1], value)

    def __delitem__(self, key: str) -> None:
        dict.__delitem__(self, key)
        twin = self._twin(key)
        if twin is not None:
            dict.pop(twin[0], twin[1], None)

    def pop(self, key: str, *default: Any) -> Any:
        if key not in self:
            return dict.pop(self, key, *default)
        value = self[key]
        del self[key]
        return value

    def __reduce__(self) -> tuple:
        return _rebuild, (type(self), dict(self), self.__dict__)


class _AdapterTable(_Twinned):
    """An adapter's table once its layer holds it: a write also lands in the layer's slot of that attribute."""

    def __init__(self, layer: AdaptedLayer | None = None, name: str = "", kind: str = "") -> None:
        super().__init__()
        self.layer, self.name, self.kind = layer, name, kind

    def _twin(self, key: str) -> tuple[dict, str] | None:
        layer = self.layer
        if layer is None or "_modules" not in layer.__dict__:
            return None
        return layer._slot(key).__dict__[self.kind], self.name


class _SlotTable(_Twinned):
    """A slot's table: a write to entry ``name`` also lands in adapter ``name``'s own table."""

    def __init__(self, slot: Slot | None = None, kind: str = "") -> None:
        super().__init__()
        self.slot, self.kind = slot, kind

    def _twin(self, key: str) -> tuple[dict, str] | None:
        slot = self.slot
        layer = None if slot is None else slot.__dict__.get("layer")
        adapter = None if layer is None else layer.__dict__.get("_adapters", {}).get(key)
        if adapter is None or self.kind not in adapter.__dict__:
            return None
        return adapter.__dict__[self.kind], slot.attr


class _SlotNonPersistent(set):
    """A slot's non-persistent buffers are the entries whose adapter registered that buffer as non-persistent."""

    def __init__(self, slot: Slot | None = None) -> None:
        super().__init__()
        self.slot = slot

    def __contains__(self, name: object) -> bool:
        slot = self.slot
        layer = None if slot is None else slot.__dict__.get("layer")
        adapter = None if layer is None else layer.__dict__.get("_adapters", {}).get(name)
        return adapter is not None and slot.attr in adapter._non_persistent_buffers_set

    def __reduce__(self) -> tuple:
        return _SlotNonPersistent, (self.slot,)


class Slot(nn.Module):
    """One attribute of every adapter on a layer, by adapter name: ``layer.lora_A["default"]``.

    An entry is whatever the adapter holds under that attribute: a child module (``lora_A.default.weight``), a
    parameter (``ia3_l.default``) or a buffer. Reads go through the usual module tables; writes reach the adapter.
    """

    def __init__(self, layer: AdaptedLayer, attr: str) -> None:
        super().__init__()
        object.__setattr__(self, "layer", layer)  # not a submodule: the layer owns this slot
        self.attr = attr
        for kind in _TABLES:
            self.__dict__[kind] = _SlotTable(self, kind)
        self.__dict__["_non_persistent_buffers_set"] = _SlotNonPersistent(self)

    def __getitem__(self, name: str) -> Any:
        for kind in _TABLES:
            table = self.__dict__[kind]
            if name in table:
                return table[name]
        raise AdapterNameError(f"adapter '{name}' holds no '{self.attr}' on this layer; it holds {self.keys()}")

    def __setitem__(self, name: str, value: Any) -> None:
        setattr(self, name, value)

    def __contains__(self, name: object) -> bool:
        return any(name in self.__dict__[kind] for kind in _TABLES)

    def keys(self) -> list[str]:
        return [k for kind in _TABLES for k, v in self.__dict__[kind].items() if v is not None]

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def items(self) -> list[tuple[str, Any]]:
        return [(k, self[k]) for k in self.keys()]

    def values(self) -> list[Any]:
        return [self[k] for k in self.keys()]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise UsageError(f"'{self.attr}' holds one entry per adapter and is not called; call layer.{self.attr}[name]")

    def extra_repr(self) -> str:
        return f"attribute {self.attr!r} of adapters {self.keys()}"


class LayerAdapter(nn.Module):
    """One adapter on one layer: what an :class:`AdaptedLayer` holds per adapter name.

    A method implements :meth:`forward`, :meth:`merge` and :meth:`unmerge`; every other hook has a do-nothing
    default here, and the wrapper calls the hooks without asking whether they exist. The two class flags say which
    forward path the layer takes for this adapter kind.
    """

    changes_input: ClassVar[bool] = False  # the base layer's input goes through transform_input (IA3 feed-forward)
    substitutes_weights: ClassVar[bool] = False  # forward replaces base parameters (substitute / merge_params)
    frozen_parameters: tuple[str, ...] = ()  # names of this adapter's parameters that never train (MiCA's B)

    def forward(self, x: Any, y: Any, base_layer: nn.Module) -> Any:
        """The layer's output ``y`` (of input ``x``) with this adapter's part added."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forward(x, y, base_layer)")

    def merge(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """Fold the adapter into the dense base weight (may write ``weight`` in place) and return it."""
        raise NotImplementedError(f"{type(self).__name__} cannot merge into its base layer")

    def unmerge(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """Take :meth:`merge` back out of the dense base weight and return it."""
        raise NotImplementedError(f"{type(self).__name__} cannot unmerge from its base layer")

    def merge_bias(self, bias: torch.Tensor) -> torch.Tensor:
        """The base bias after merging: a new tensor, or ``bias`` itself when merging leaves it alone."""
        return bias

    def unmerge_bias(self, bias: torch.Tensor) -> torch.Tensor:
        """The base bias after unmerging (``bias`` itself when unchanged)."""
        return bias

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's input, changed (called only for kinds with ``changes_input``)."""
        return x

    def fused_forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor | None:
        """Base output plus this adapter's part in one step, when the adapter can do better than base then update;
        ``None``: take the plain path."""
        return None

    @staticmethod
    def mixed_forward(adapters: list[Any], index: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                      base_layer: nn.Module, cache: dict) -> torch.Tensor | None:
        """A mixed batch in one call: row i uses ``adapters[index[i]]`` (``None``: no adapter). ``cache`` lives as
        long as the layer's set of adapters. ``None``: the layer runs each row group through :meth:`forward`."""
        return None

    @staticmethod
    def routed_forward(adapters: list[Any], index: torch.Tensor | None, x: Any, args: tuple, kwargs: dict,
                       base_layer: nn.Module) -> Any:
        """Run the base layer with weight-substituting adapters (per row when ``index`` is given) at a cost that
        follows the rows; ``None``: not offered (one adapter falls back to :meth:`substitute`)."""
        return None

    def substitute(self, base_layer: nn.Module, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Parameters of ``base_layer`` (by name) to run it with, this adapter's change added to ``params``."""
        return params

    def merge_params(self, base_layer: nn.Module, sign: float) -> None:
        """Add (``sign`` 1) or remove (-1) this adapter's change in the base's own parameters."""
        raise NotImplementedError(f"{type(self).__name__} cannot merge into its base layer's parameters")

    @property
    def holds_base_offset(self) -> bool:
        """Whether the adapter took something from the base weight when attached (PiSSA, OLoRA) that
        :meth:`restore_base` gives back."""
        return False

    def restore_base(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """The dense base weight with what the adapter took at attach given back (it leaves unmerged)."""
        return weight

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to save, by name under the layer's path (live tensors); by default the adapter's state."""
        return self.state_dict(keep_vars=True)

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take saved tensors (names and shapes checked against :meth:`saved_tensors`; some may be absent)."""
        copy_saved(self.saved_tensors(), tensors)

    def attached(self, layer: AdaptedLayer, name: str) -> None:
        """The adapter joined ``layer`` under ``name``: arrange whatever it keeps outside its own tables."""

    def detached(self, layer: AdaptedLayer, name: str) -> None:
        """The adapter is leaving ``layer``: undo :meth:`attached`."""


class AdaptedLayer(nn.Module):
    """Wraps ``base_layer`` and holds its adapters by name.

    Attributes:
        base_layer: the original module, called unchanged.
        adapters: adapter name -> adapter module (``adapter(x, y, base_layer) -> y'``; ``merge(w, base_layer)`` and
            ``unmerge(w, base_layer)`` may update the dense weight ``w`` in place and return it). Read-only; the
            adapters' tensors are registered on the layer as ``<attribute>.<adapter name>`` (see :class:`Slot`).
        active: names of the adapters applied in forward, in order.
        merged_adapters: names of the adapters currently folded into the base weight, in merge order (``merged``:
            whether there is any).
        disabled: when set, forward is the base layer alone.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._adapters: dict[str, nn.Module] = {}
        self.active: list[str] = []
        self.merged_adapters: list[str] = []
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

    @property
    def adapters(self) -> MappingProxyType[str, nn.Module]:
        return MappingProxyType(self._adapters)

    # ------------------------------------------------------------------ the ecosystem's layer attributes
    def get_base_layer(self) -> nn.Module:
        """The innermost original module (through nested wrappers)."""
        base = self.base_layer
        while isinstance(base, AdaptedLayer):
            base = base.base_layer
        return base

    @property
    def active_adapters(self) -> list[str]:
        return list(self.active)

    @property
    def active_adapter(self) -> str | list[str]:
        return self.active[0] if len(self.active) == 1 else list(self.active)

    @property
    def disable_adapters(self) -> bool:
        return self.disabled

    @property
    def merged(self) -> bool:
        """Whether any adapter is folded into the base weight (``merged_adapters`` says which)."""
        return bool(self.merged_adapters)

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Make ``adapter_names`` this layer's active adapters (those it holds); they train, the others freeze."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.active = [n for n in names if n in self._adapters]
        for name, adapter in self._adapters.items():
            adapter.requires_grad_(name in self.active)
            for frozen in adapter.frozen_parameters:
                adapter.get_parameter(frozen).requires_grad_(False)

    # ------------------------------------------------------------------ adapters
    def _slot(self, attr: str) -> Slot:
        slot = self._modules.get(attr)
        if slot is None:
            if attr in self.__dict__ or attr in self._parameters or attr in self._buffers or \
                    hasattr(type(self), attr):
                raise UnsupportedError(f"an adapter attribute cannot be named {attr!r}: AdaptedLayer uses that name")
            slot = Slot(self, attr)
            self._modules[attr] = slot
        elif not isinstance(slot, Slot):
            raise UnsupportedError(f"an adapter attribute cannot be named {attr!r}: AdaptedLayer uses that name")
        return slot

    def add(self, name: str, adapter: LayerAdapter) -> None:
        if not isinstance(adapter, LayerAdapter):
            raise UsageError(f"an adapted layer holds LayerAdapter instances, got {type(adapter).__name__}; derive "
                             "the adapter class from graftkit.layer.LayerAdapter")
        if name in self._adapters:
            raise AdapterNameError(f"adapter '{name}' already exists on this layer; pick another name")
        for kind in _TABLES:  # check every attribute name before anything changes
            for attr in adapter.__dict__[kind]:
                if attr == "base_layer" or (attr not in self._modules and (
                        attr in self.__dict__ or hasattr(type(self), attr))):
                    raise UnsupportedError(f"{type(adapter).__name__} has an attribute {attr!r}, which AdaptedLayer "
                                           "uses itself; rename it in the adapter")
        self._adapters[name] = adapter
        for kind in _TABLES:
            own = adapter.__dict__[kind]
            table = _AdapterTable(self, name, kind)
            dict.update(table, own)
            adapter.__dict__[kind] = table
            for attr, value in own.items():
                _raw_put(self._slot(attr).__dict__[kind], name, value)
        adapter.train(self.training)
        self._stacks.clear()
        adapter.attached(self, name)
        if adapter.changes_input:
            self._input_adapters = self._input_adapters | {name}
        if adapter.substitutes_weights:
            self._param_adapters = self._param_adapters | {name}

    def remove(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge()
        self.release(name)
        self._adapters[name].detached(self, name)
        adapter = self._adapters.pop(name)
        for kind in _TABLES:  # the adapter becomes a plain module again, with all it held
            adapter.__dict__[kind] = dict(adapter.__dict__[kind])
        for attr, slot in list(self._modules.items()):
            if isinstance(slot, Slot):
                for kind in _TABLES:
                    dict.pop(slot.__dict__[kind], name, None)
                if not len(slot):
                    del self._modules[attr]
        self.active = [n for n in self.active if n != name]
        self._stacks.clear()
        self._input_adapters = self._input_adapters - {name}
        self._param_adapters = self._param_adapters - {name}

    def replace(self, name: str, adapter: LayerAdapter) -> None:
        """Put ``adapter`` in the place of adapter ``name`` (kept active if it was; nothing is merged)."""
        was_active = name in self.active
        active = list(self.active)
        self.remove(name)
        self.add(name, adapter)
        self.active = active if was_active else self.active

    def train(self, mode: bool = True) -> AdaptedLayer:
        super().train(mode)
        for adapter in self.__dict__.get("_adapters", {}).values():  # their children follow through the slots
            adapter.training = mode
        return self

    def release(self, name: str) -> None:
        """The unmerged adapter ``name`` leaves: it gives back what it took from the base weight at attach
        (``restore_base``: PiSSA/OLoRA's principal part), so the base is the original again."""
        adapter = self._adapters[name]
        if adapter.holds_base_offset and name not in self.merged_adapters:
            set_weight(self.base_layer, adapter.restore_base(get_weight(self.base_layer), self.base_layer))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Submodules are read from ``_modules`` directly: this runs once per adapted layer per decode step, and
        # attribute access on a module goes through ``__getattr__`` (twice, with the fallback above).
        base = self._modules["base_layer"]
        if self.disabled:
            if self.merged_adapters:
                self.unmerge()
            return base(x, *args, **kwargs)
        adapters = self._adapters
        if self._param_adapters:
            y = self._substituted_forward(x, args, kwargs, adapters)
            if self.routing is not None:
                return y  # each row's adapter already took part
        elif self._input_adapters:
            y = base(self._transform_input(x, adapters), *args, **kwargs)
        else:
            if self.routing is None and not self.merged_adapters and len(self.active) == 1 and not args \
                    and not kwargs:
                # One adapter on the layer: let it compute base + update in one fused step where it can.
                adapter = adapters.get(self.active[0])
                y = None if adapter is None else adapter.fused_forward(x, base)
                if y is not None:
                    return y
            y = base(x, *args, **kwargs)
        if self.routing is not None:
            return self._mixed_forward(x, y)
        for name in self.active:
            if name in adapters and name not in self.merged_adapters:
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
            if routing is not None and not present:  # no row's adapter is on this layer (nested layers may be)
                return self._modules["base_layer"](x, *args, **kwargs)
            y = None
            if present and all(type(a) is type(present[0]) for a in present):
                y = type(present[0]).routed_forward(per_name, routing.index, x, args, kwargs, self.base_layer)
            if y is None:
                kind = type(self.base_layer).__name__
                raise UsageError(f"mixed-adapter batches (adapter_names) cannot run through {kind}, whose adapters "
                                 "replace its weights; run one adapter per call")
            return y
        live = [n for n in self.active if n in self._param_adapters and n not in self.merged_adapters]
        if len(live) == 1:
            y = type(adapters[live[0]]).routed_forward([adapters[live[0]]], None, x, args, kwargs, self.base_layer)
            if y is not None:
                return y
        params: dict[str, torch.Tensor] = {}
        for name in self.active:
            if name in self._param_adapters and name not in self.merged_adapters:
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
            if name in self._input_adapters and name not in self.merged_adapters:
                x = adapters[name].transform_input(x)
        return x

    def _mixed_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each row gets its own adapter (``self.routing``); rows of ``"__base__"`` get none."""
        routing = self.routing.for_batch(x.shape[0])
        per_name = [self._adapters[n] if n in self._adapters else None for n in routing.unique]
        present = [a for a in per_name if a is not None]
        if not present:
            return y
        # One batched call when the adapter kind offers it (LoRA on linear layers: gathered bmm).
        if all(type(a) is type(present[0]) for a in present):
            out = type(present[0]).mixed_forward(per_name, routing.index, x, y, self.base_layer, self._stacks)
            if out is not None:
                return out

        def run(name: str, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor | None:
            return self._adapters[name](xs, ys, self.base_layer) if name in self._adapters else None

        return grouped_forward(routing, x, y, run)

    # ------------------------------------------------------------------ merge
    def _to_merge(self, names: Iterable[str] | None) -> list[str]:
        return [n for n in (self.active if names is None else names)
                if n in self._adapters and n not in self.merged_adapters]

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
                    params = self._adapters[name].substitute(self.base_layer, params)
            if not all(all_finite(p) for p in params.values()):
                raise UsageError(f"merging adapter(s) {todo} into '{module_name or type(self.base_layer).__name__}' "
                                 "would write NaN/Inf into the base weights; nothing was merged")
            return
        merged = get_weight(self.base_layer).clone()
        bias = self._bias()
        bias = None if bias is None else bias.detach().clone()
        for name in todo:
            merged = self._adapters[name].merge(merged, self.base_layer)
            if bias is not None:
                bias = self._adapters[name].merge_bias(bias)
        if not all_finite(merged) or (bias is not None and not all_finite(bias)):
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
                self._adapters[name].merge_params(self.base_layer, 1.0)
            self.merged_adapters.extend(todo)
            return
        merged = get_weight(self.base_layer)  # plain layers: the live weight, which adapters update in place
        bias = self._bias()
        for name in todo:
            merged = self._adapters[name].merge(merged, self.base_layer)
            if bias is not None:
                self._write_bias(bias, self._adapters[name].merge_bias)
        set_weight(self.base_layer, merged)
        self.merged_adapters.extend(todo)

    def unmerge(self) -> None:
        """Take every merged adapter back out of the base weight (last merged first)."""
        if not self.merged_adapters:
            return
        if self._merges_params(self.merged_adapters):
            for name in reversed(self.merged_adapters):
                self._adapters[name].merge_params(self.base_layer, -1.0)
            self.merged_adapters = []
            return
        weight = get_weight(self.base_layer)
        bias = self._bias()
        for name in reversed(self.merged_adapters):
            weight = self._adapters[name].unmerge(weight, self.base_layer)
            if bias is not None:
                self._write_bias(bias, self._adapters[name].unmerge_bias)
        set_weight(self.base_layer, weight)
        self.merged_adapters = []

    def _merges_params(self, names: list[str]) -> bool:
        """Whether these adapters merge by writing the base's parameters themselves (``merge_params``), not
        through the dense-weight access of ``weights.py``; a layer's adapters do one or the other."""
        kinds = {self._adapters[n].substitutes_weights for n in names}
        if len(kinds) > 1:
            raise UsageError(f"adapters {names} on {type(self.base_layer).__name__} merge in different ways; merge "
                             "them one at a time")
        return kinds == {True}

    @staticmethod
    def _write_bias(bias: torch.Tensor, change: Any) -> None:
        """Write ``change(bias)`` into the live bias when it is a new tensor (the adapter changed the bias)."""
        with torch.no_grad():
            current = bias.detach().clone()
            new = change(current)
            if new is not current:
                bias.copy_(new)

    def _bias(self) -> torch.Tensor | None:
        bias = getattr(self.base_layer, "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None


class Nest(nn.Module):
    """Holds an adapted layer under one more name, where the ecosystem lays an adapter out that way (LoRA's trainable
    tokens: ``embed_tokens.token_adapter.base_layer.weight``). It calls that layer and reads attributes through it;
    the model wrapper removes it with the layer (:func:`graftkit.model.put_back`)."""

    def __init__(self, attr: str, inner: nn.Module) -> None:
        super().__init__()
        self.attr = attr
        self.add_module(attr, inner)

    @property
    def inner(self) -> nn.Module:
        return self._modules[self.attr]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            attr = self.__dict__.get("attr")
            if modules is None or attr not in modules:
                raise
            return getattr(modules[attr], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._modules[self.attr](*args, **kwargs)


class ModelAdapter(nn.Module):
    """An adapter that changes what the base model receives instead of wrapping its layers (prompt methods).

    The model wrapper calls the active one around the base model; every hook has a do-nothing default, so a
    method implements only what it changes. Its parameters are trained and saved like any adapter's.
    """

    live = False  # set by the model wrapper before each forward: this adapter is the one that applies
    # The ecosystem's layout for this kind: the bare model as PeftModel.base_model, the adapter in
    # PeftModel.prompt_encoder.<name> (prompt methods); False keeps base_model.model (adaption prompts).
    bare_base_model: ClassVar[bool] = True

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
