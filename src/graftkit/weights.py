"""Weight access per base-layer kind: the dense weight in the layer's own layout, read and written back.

Forward never comes here: a base layer is always called as it is, quantized or not. Only merge/unmerge
(and methods whose forward needs the weight, like DoRA's column norms) read the dense weight. A new
backend (bitsandbytes 4-bit, 8-bit ...) adds one ``WeightAccess`` here; no adapter class changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedError


@dataclass(frozen=True)
class WeightAccess:
    """How to read and write the dense weight of one kind of base layer."""

    matches: Callable[[nn.Module], bool]
    get: Callable[[nn.Module], torch.Tensor]
    set: Callable[[nn.Module, torch.Tensor], None]


def _plain_get(layer: nn.Module) -> torch.Tensor:
    return layer.weight.detach()


def _plain_set(layer: nn.Module, weight: torch.Tensor) -> None:
    with torch.no_grad():
        layer.weight.copy_(weight.to(layer.weight.dtype))


def _is_plain(layer: nn.Module) -> bool:
    weight = getattr(layer, "weight", None)
    return type(weight) in (torch.Tensor, nn.Parameter) and weight.dtype.is_floating_point


# Checked in order; quantized backends register before the plain entry so they win.
_ACCESS: list[WeightAccess] = [WeightAccess(_is_plain, _plain_get, _plain_set)]


def register_access(access: WeightAccess) -> None:
    """Add a backend; it is tried before the ones already known."""
    _ACCESS.insert(0, access)


def _access(layer: nn.Module) -> WeightAccess:
    for access in _ACCESS:
        if access.matches(layer):
            return access
    raise UnsupportedError(
        f"no weight access for {type(layer).__name__}: graftkit cannot read or merge its weight; "
        "use the adapter unmerged, or load the base model in full precision"
    )


def get_weight(layer: nn.Module) -> torch.Tensor:
    """The dense weight of ``layer`` in its own layout (``nn.Linear``: (out, in); ``Conv1D``: (in, out))."""
    return _access(layer).get(layer)


def set_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Write a dense weight back into ``layer`` (re-quantizing where the backend stores it quantized)."""
    _access(layer).set(layer, weight)
