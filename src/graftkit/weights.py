"""Weight access per base-layer kind: the dense weight in the layer's own layout, read and written back.

Forward never comes here: a base layer is always called as it is, quantized or not. Only merge/unmerge
(and methods whose forward needs the weight, like DoRA's column norms) read the dense weight. A new
backend adds one ``WeightAccess`` entry to ``_ACCESS`` here; no adapter class changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
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




# ---------------------------------------------------------------------------------------------- bitsandbytes
# 4-bit (NF4/FP4, optional double quantization): the weight is a packed ``Params4bit`` with a ``quant_state``.
def _own_weight(layer: nn.Module) -> object:
    # The layer's own parameter, not one a wrapper passes through from its base layer.
    return getattr(layer, "_parameters", {}).get("weight")


def _is_bnb_4bit(layer: nn.Module) -> bool:
    return type(_own_weight(layer)).__name__ == "Params4bit"


def _get_bnb_4bit(layer: nn.Module) -> torch.Tensor:
    import bitsandbytes as bnb

    weight = layer.weight
    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        data, state = _standard_4bit(data, state)
    return bnb.functional.dequantize_4bit(data, state)  # (out, in) in the original dtype


def _standard_4bit(data: torch.Tensor, state: object) -> tuple[torch.Tensor, object]:
    """The standard 4-bit layout of a weight that bitsandbytes repacked for its AVX512-BF16 CPU kernel.

    On CPUs with AVX512-BF16, bitsandbytes (>= 0.49) rewrites a ``Linear4bit`` weight in place on its first
    inference forward: codes reordered in blocks of 32 output rows, double quantization undone, absmax stored
    transposed in bf16. Its ``dequantize_4bit`` does not understand that layout and returns wrong values, and its
    inverse conversion mutates the layer's quant state. This reads the repacked weight without changing the layer.
    """
    import bitsandbytes as bnb

    rows, cols = state.shape  # (out, in)
    packed = data.view(torch.uint8).reshape(-1, 32)  # each row: 32 low nibbles, then 32 high nibbles
    codes = torch.cat([packed & 0xF, packed >> 4], dim=-1)  # (rows/32 * cols/2, 64)
    codes = codes.reshape(rows // 32, cols // 2, 32, 2).transpose(1, 2).reshape(-1)  # (rows * cols,) row-major
    standard = ((codes[0::2] << 4) | codes[1::2]).reshape(-1, 1)  # two codes a byte, first in the high nibble
    absmax = state.absmax.T.reshape(-1).float()  # (rows * cols / blocksize,)
    dtype = getattr(state, "original_dtype", torch.float32)
    return standard, bnb.functional.QuantState(
        absmax=absmax, shape=state.shape, code=state.code, blocksize=state.blocksize,
        quant_type=state.quant_type, dtype=dtype,
    )


def _set_bnb_4bit(layer: nn.Module, dense: torch.Tensor) -> None:
    import bitsandbytes as bnb

    old = layer.weight
    # A fresh Params4bit quantizes itself on .to(device) with the same format as the one it replaces.
    layer.weight = bnb.nn.Params4bit(
        dense.to(dtype=old.quant_state.dtype, device="cpu"), requires_grad=False, blocksize=old.blocksize,
        compress_statistics=old.compress_statistics, quant_type=old.quant_type, quant_storage=old.quant_storage,
        module=layer,
    ).to(old.device)


# 8-bit (LLM.int8()): int8 rows with one absmax scale per output row (``SCB``).
def _is_bnb_8bit(layer: nn.Module) -> bool:
    return type(_own_weight(layer)).__name__ == "Int8Params"


def _scales_8bit(layer: nn.Module) -> torch.Tensor:
    scales = getattr(layer.weight, "SCB", None)
    return layer.state.SCB if scales is None else scales


def _get_bnb_8bit(layer: nn.Module) -> torch.Tensor:
    import bitsandbytes as bnb

    return bnb.functional.int8_vectorwise_dequant(layer.weight.data, _scales_8bit(layer))  # (out, in) fp32


def _set_bnb_8bit(layer: nn.Module, dense: torch.Tensor) -> None:
    import bitsandbytes as bnb

    old = layer.weight
    layer.weight = bnb.nn.Int8Params(
        dense.to(dtype=torch.float16, device="cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights
    ).to(old.device)
    layer.state.reset_grads()  # drop the cached CB/SCB of the old weight
    layer.state.CB, layer.state.SCB = None, None


# Checked in order; quantized backends come before the plain entry.
_ACCESS: list[WeightAccess] = [
    WeightAccess(_is_bnb_4bit, _get_bnb_4bit, _set_bnb_4bit),
    WeightAccess(_is_bnb_8bit, _get_bnb_8bit, _set_bnb_8bit),
    WeightAccess(_is_plain, _plain_get, _plain_set),
]


def quantized_values(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The values a dense (out, in) ``weight`` takes once bitsandbytes stores it in ``bits`` bits (4: NF4 in blocks
    of 64, no double quantization; 8: LLM.int8() rows), back in float32 on the weight's device.

    Raises:
        UnsupportedError: bitsandbytes is not installed.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise UnsupportedError(f"{bits}-bit quantization needs bitsandbytes: pip install 'graftkit[quant]'") from err
    w = weight.detach().to(torch.float32)
    if bits == 4:
        packed, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
        return bnb.functional.dequantize_4bit(packed, state).to(torch.float32)
    codes, scales, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16))
    return bnb.functional.int8_vectorwise_dequant(codes, scales).to(torch.float32)


def is_quantized(layer: nn.Module) -> bool:
    """Whether ``layer`` stores its weight quantized (writing a weight back rounds it)."""
    return any(access.matches(layer) for access in _ACCESS if access.matches is not _is_plain)


def dense_linear(layer: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` holding the dequantized weight (and bias) of a quantized linear layer."""
    weight = get_weight(layer)
    dtype = dtype or weight.dtype
    bias = getattr(layer, "bias", None)
    dense = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(weight.to(dtype))
        if bias is not None:
            dense.bias.copy_(bias.to(dtype))
    dense.requires_grad_(False)
    return dense


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


def linear_features(layer: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear layer of any kind (``nn.Linear``, transformers ``Conv1D`` storing
    (in, out), quantized linears), or ``None`` for other layers; read without touching the weight's data."""
    if type(layer).__name__ == "Conv1D":
        fan_in, fan_out = getattr(layer.weight, "ds_shape", layer.weight.shape)  # ZeRO-3 keeps the full shape there
        return fan_in, fan_out
    if isinstance(getattr(layer, "in_features", None), int) and not isinstance(layer, nn.Embedding):
        return layer.in_features, layer.out_features
    return None


def is_partitioned(tensor: object) -> bool:
    """Whether ``tensor`` is a DeepSpeed ZeRO-3 partition (its data lives spread over ranks between forwards)."""
    return hasattr(tensor, "ds_id")


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite. A finite sum proves it (a NaN or an infinity makes the sum non-finite) at the
    cost of one reduction; only a sum that is not finite (a NaN somewhere, or finite values adding up past the
    range) pays the elementwise test."""
    if not tensor.is_floating_point():
        return True
    if bool(torch.isfinite(tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32))):
        return True
    return bool(torch.isfinite(tensor).all())


def shape_of(tensor: torch.Tensor) -> tuple[int, ...]:
    """The tensor's whole shape (a ZeRO-3 partition's is ``ds_shape``; its own is empty between forwards)."""
    return tuple(tensor.ds_shape) if is_partitioned(tensor) else tuple(tensor.shape)


def numel_of(tensor: torch.Tensor) -> int:
    """The tensor's whole element count (a ZeRO-3 partition's is ``ds_numel``)."""
    return int(tensor.ds_numel) if is_partitioned(tensor) else tensor.numel()


@contextlib.contextmanager
def writable(tensors: Iterable[torch.Tensor]) -> Iterator[None]:
    """Inside, the ZeRO-3 partitions among ``tensors`` are whole and may be written; on exit rank 0's values are
    partitioned again (every rank must enter: a collective call). Other tensors are untouched."""
    partitioned = [t for t in tensors if is_partitioned(t)]
    if not partitioned:
        yield
        return
    import deepspeed  # a ZeRO-3 partition exists only where DeepSpeed made it

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
        yield


def full_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` whole: FSDP2 shards gathered (``full_tensor``, a collective call on every rank), DeepSpeed ZeRO-3
    partitions gathered and copied (every rank takes part too); other tensors as they are."""
    out = {k: (t.full_tensor() if hasattr(t, "full_tensor") else t) for k, t in tensors.items()}
    partitioned = {k: t for k, t in out.items() if is_partitioned(t)}
    if partitioned:
        import deepspeed  # a ZeRO-3 partition exists only where DeepSpeed made it

        with deepspeed.zero.GatheredParameters(list(partitioned.values()), modifier_rank=None):
            out.update({k: t.detach().clone() for k, t in partitioned.items()})
    return out
