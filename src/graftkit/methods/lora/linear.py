"""LoRA (and DoRA) on linear layers: ``nn.Linear``, transformers' ``Conv1D`` and quantized linears.

::

            ┌──────────── W (frozen) ────────────┐
    x ──────┤                                    ├──(+)──► y = W x + s · B A x
            └─ dropout ─► A (r×in) ─► B (out×r) ─┘
                                       s = alpha / r   (rsLoRA: alpha / sqrt(r))

A starts random and B at zero, so training starts from the base model. Merging writes W + s·BA into the
base weight. DoRA splits the adapted weight into a direction and a learned magnitude ``m`` per output:

    W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_row        (the norm is treated as a constant in backward, §4.3)

Forward adds ``(m/‖·‖ − 1) ⊙ (W x) + (m/‖·‖) ⊙ s·B A x`` to the base output, so a quantized base is still
called as it is. Also here: the helpers every LoRA layer kind shares (scaling, adapter dtype, DoRA's magnitude
module, bias merging, the pair initialisation, LoftQ's alternating quantization).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UnsupportedError
from ...kernels.lora import FusedLoraLinear, LoraUpdate, can_fuse, can_seed_dropout, draw_seed
from ...layer import LayerAdapter
from ...registry import is_loading
from ...weights import get_weight, is_quantized, linear_features, writable
from .config import LoraConfig
from .inits import LINEAR, InitInput, init_of


def _scaling(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    # Adapter weights are fp32 masters over half-precision bases (optimizer updates survive); the forward
    # casts them to the activation dtype instead of casting the (much larger) activations to fp32.
    if weight.dtype in (torch.float16, torch.bfloat16) or not weight.dtype.is_floating_point:
        return torch.float32
    return weight.dtype


class _Magnitude(nn.Module):
    """DoRA's magnitude m: ``lora_magnitude_vector.<adapter>.weight`` in memory, as the ecosystem names it; files
    keep the bare name ``lora_magnitude_vector`` (the owning adapter's state dict says so)."""

    def __init__(self, owner: nn.Module, norm: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(norm)
        owner._register_state_dict_hook(_magnitude_on_disk)


def _magnitude_on_disk(module: nn.Module, state: dict[str, Any], prefix: str, _: Any) -> None:
    key = f"{prefix}lora_magnitude_vector.weight"
    if key in state:
        state[f"{prefix}lora_magnitude_vector"] = state.pop(key)


class _BiasMerge:
    """``lora_bias``: merging adds s·b_B to the base layer's bias (and unmerging takes it out)."""

    lora_B: nn.Module
    scaling: float | torch.Tensor

    def merge_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias if self.lora_B.bias is None else bias + self.scaling * self.lora_B.bias.detach().to(bias.dtype)

    def unmerge_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias if self.lora_B.bias is None else bias - self.scaling * self.lora_B.bias.detach().to(bias.dtype)


class LoraFactors(LayerAdapter):
    """A LoRA adapter whose update is one pair s·B A read in a layer kind's own layout (linear layers, embeddings,
    convolutions): what combining, hot-swapping and conversions work on. A layer kind answers its saved shapes and
    builds itself (``saved_shapes`` / ``build``, asked through the kinds table in ``layers.py``)."""

    lora_A: nn.Module
    lora_B: nn.Module
    scaling: float | torch.Tensor
    fan_in_fan_out = False

    @classmethod
    def saved_shapes(cls, base_layer: nn.Module, config: LoraConfig, r: int) -> dict[str, tuple] | None:
        """The adapter's tensors on ``base_layer`` by saved name, with their shapes (``None``: not this kind)."""
        raise NotImplementedError

    @classmethod
    def build(cls, base_layer: nn.Module, config: LoraConfig, module_name: str, r: int, alpha: float,
              init: bool | str) -> LayerAdapter:
        """The adapter for ``base_layer`` (``init`` already resolved for this kind by the inits table)."""
        raise NotImplementedError

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B): A is (r, in, ...), B is (out, r, ...)."""
        return self.lora_A.weight, self.lora_B.weight

    def set_factors(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Put new factors in place (another rank allowed)."""
        self.lora_A.weight, self.lora_B.weight = a, b
        self.lora_A.out_channels = self.lora_A.out_features = a.shape[0]
        self.lora_B.in_channels = self.lora_B.in_features = a.shape[0]

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def native_delta(self) -> torch.Tensor:
        """s·B A in the base layer's own weight layout (Conv1D: (in, out); embeddings: (num, dim); convs: 4-D)."""
        delta = self.delta_weight()
        return delta.T if self.fan_in_fan_out else delta

    def as_matrix(self, delta: torch.Tensor) -> torch.Tensor:
        """A native-layout delta as the (out, in) matrix that B A factors."""
        return delta.T if self.fan_in_fan_out else delta.flatten(1)


class LoraLinear(_BiasMerge, LoraFactors):
    """LoRA (optionally DoRA) on a linear layer: ``nn.Linear`` or transformers ``Conv1D`` (fan_in_fan_out)."""

    @classmethod
    def saved_shapes(cls, base_layer: nn.Module, config: LoraConfig, r: int) -> dict[str, tuple] | None:
        features = linear_features(base_layer)
        if features is None:
            return None
        fan_in, fan_out = features
        shapes = {"lora_A.weight": (r, fan_in), "lora_B.weight": (fan_out, r)}
        if config.lora_bias:
            shapes["lora_B.bias"] = (fan_out,)
        if config.use_dora:
            shapes["lora_magnitude_vector"] = (fan_out,)
        return shapes

    @classmethod
    def build(cls, base_layer: nn.Module, config: LoraConfig, module_name: str, r: int, alpha: float,
              init: bool | str) -> LoraLinear:
        return cls(base_layer, r, alpha, config.lora_dropout, config.use_rslora, config.use_dora, init,
                   type(base_layer).__name__ == "Conv1D", config.lora_bias, config)

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float,
        use_rslora: bool,
        use_dora: bool,
        init: bool | str,
        fan_in_fan_out: bool,
        lora_bias: bool = False,
        options: LoraConfig | None = None,
    ) -> None:
        super().__init__()
        weight = get_weight(base_layer)
        # The layer's own sizes where it has them: DeepSpeed ZeRO-3 leaves its weight an empty partition here.
        features = linear_features(base_layer)
        in_features, out_features = features or (weight.shape if fan_in_fan_out else weight.shape[::-1])
        kw = {"device": weight.device, "dtype": _adapter_dtype(weight)}
        self.lora_A = nn.Linear(in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, out_features, bias=lora_bias, **kw)
        self.scaling = _scaling(r, alpha, use_rslora)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fan_in_fan_out = fan_in_fan_out
        # PiSSA/OLoRA: (A₀, B₀) whose s·B₀A₀ the base gives up when the adapter is attached; restored when it leaves.
        self.base_offset: tuple[torch.Tensor, torch.Tensor] | None = None
        self.offset_applied = False
        # LoftQ: the base's new weight (its quantized values), written once every adapter is built.
        self.pending_base: torch.Tensor | None = None
        start = init_of(init)
        self.frozen_parameters: tuple[str, ...] = tuple(v for k, v in start.frozen.items() if k == LINEAR)
        if lora_bias:
            nn.init.zeros_(self.lora_B.bias)
        if start.build is None or (start.from_file and is_loading()):
            # noise; or A and B come from the file, fitted to the base the user saved (LoftQ: the quantized one;
            # LoRA-GA: the residual): nothing to compute
            _init_pair(self.lora_A.weight, self.lora_B.weight, init if start.build is None else True, r)
        else:
            if start.float_base is not None and is_quantized(base_layer):
                raise UnsupportedError(f"init_lora_weights={init!r} needs a float base layer, got a quantized "
                                       f"{type(base_layer).__name__}: {start.float_base}")
            self._init_from_weight(init, weight, r, options, getattr(base_layer, start.prepared or "", None))
        self.use_dora = use_dora
        if use_dora:
            with torch.no_grad():  # W + s·BA: the weight the adapted layer computes (the base itself under PiSSA/OLoRA)
                w = self._oi((weight if self.pending_base is None else self.pending_base).to(kw["dtype"]))
                norm = self._row_norm(w, torch.zeros_like(w) if self.base_offset else self.delta_weight())
            self.lora_magnitude_vector = _Magnitude(self, norm)  # (out,)
        self._dora_merge_scale: torch.Tensor | None = None
        self._cast: tuple | None = None  # (key, A, B) in an activation dtype, for inference (see _weights)

    def _init_from_weight(self, init: str, weight: torch.Tensor, r: int, options: LoraConfig | None,
                          prepared: Any) -> None:
        """A and B (and LoftQ's new base) from the init's entry in the table (``inits.py``)."""
        start = init_of(init)
        settings = (getattr(options, f"{init}_config", None) if options is not None and start.settings else None)
        if start.settings is not None and not settings:
            settings = dataclasses.asdict(start.settings())
        out_features, in_features = self.lora_B.weight.shape[0], self.lora_A.weight.shape[1]
        ctx = InitInput(init, weight, self._oi, out_features, in_features, r, self.scaling, settings or {}, prepared,
                        ("min(out, in)", f"a layer of shape {tuple(self._oi(weight).shape)}"))
        with torch.no_grad():
            built = start.build(ctx)
            self.lora_A.weight.copy_(built.a.contiguous())
            self.lora_B.weight.copy_(built.b.contiguous())
            if built.base is not None:
                self.pending_base = self._oi(built.base).to(weight.dtype).contiguous()
        if start.moves_base:
            self.base_offset = (self.lora_A.weight.detach().clone(), self.lora_B.weight.detach().clone())

    def shift_base(self, weight: torch.Tensor, sign: float) -> torch.Tensor:
        """weight + sign · s·B₀A₀ (the attach-time offset), in place."""
        a0, b0 = self.base_offset
        w = self._oi(weight)
        w.add_((b0 @ a0).mul_(sign * self.scaling).to(w.dtype))
        return weight

    @property
    def holds_base_offset(self) -> bool:
        return self.base_offset is not None and self.offset_applied

    def restore_base(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """Give the base back what PiSSA/OLoRA took from it at attach (the adapter is leaving unmerged)."""
        if self.base_offset is None or not self.offset_applied:
            return weight
        self.offset_applied = False
        return self.shift_base(weight, 1.0)

    # The base weight as (out, in), whatever the layer stores.
    def _oi(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.fan_in_fan_out else weight

    @staticmethod
    def _row_norm(weight_oi: torch.Tensor, delta_oi: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(weight_oi + delta_oi, dim=1)  # (out,)

    def delta_weight(self) -> torch.Tensor:
        """s · B A as (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def _dropout_p(self) -> float:
        """The dropout probability in effect now (0 in eval mode or without dropout)."""
        dropout = self._modules["lora_dropout"]
        return dropout.p if (self.training and isinstance(dropout, nn.Dropout)) else 0.0

    def _weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B in ``dtype`` (the activation dtype).

        fp32 master weights over a half-precision base are cast per forward while they train (the cast is part
        of the graph). When nothing is differentiated (inference, decode) the cast is kept and reused until a
        weight changes (version counter or storage), so a decode step does not pay two cast kernels per layer.
        """
        a = self._modules["lora_A"]._parameters["weight"]
        b = self._modules["lora_B"]._parameters["weight"]
        if a.dtype == dtype:
            return a, b
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
            return a.to(dtype), b.to(dtype)
        # Inference-mode tensors cannot enter a graph later, so a copy made under inference_mode is not reused
        # outside it (and the other way round).
        key = (dtype, a.device, a.data_ptr(), a._version, b.data_ptr(), b._version,
               torch.is_inference_mode_enabled())
        if self._cast is None or self._cast[0] != key:
            self._cast = (key, a.detach().to(dtype), b.detach().to(dtype))
        return self._cast[1], self._cast[2]

    def fused_forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor | None:
        """``base_layer(x)`` plus this adapter in one fused node, or ``None`` where that would not be exact."""
        if self.use_dora or self.lora_B.bias is not None or isinstance(self.scaling, torch.Tensor) or \
                not can_fuse(base_layer, x):
            return None
        # Parameters are read from the module dicts: this runs per layer per decode step, and attribute access
        # on a module goes through ``nn.Module.__getattr__``.
        a, b = self._weights(x.dtype)
        weight, bias = base_layer._parameters["weight"], base_layer._parameters["bias"]
        transposed = type(base_layer) is not nn.Linear
        p = self._dropout_p()
        if p == 0.0 and not (torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad)):
            # Nothing to differentiate (inference, decode steps): the same ops without an autograd node,
            # whose bookkeeping costs more than the matmuls themselves at decode sizes.
            y = F.linear(x, weight.t() if transposed else weight, bias)  # (..., out), contiguous
            h = F.linear(x, a)  # (..., r)
            y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), b.t(), alpha=self.scaling)
            return y
        if p > 0.0 and not can_seed_dropout(x):
            return None
        seed = draw_seed() if p > 0.0 else 0
        return FusedLoraLinear.apply(x, weight, bias, a, b, self.scaling, p, seed, transposed)

    def forward(self, x: torch.Tensor, y: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        dtype = x.dtype
        a, b = self._weights(dtype)
        p = self._dropout_p()
        if self.lora_B.bias is not None:  # lora_bias: s·(B h + b_B)
            y = y + self.scaling * self.lora_B.bias.to(dtype)
        if isinstance(self.scaling, torch.Tensor) and not self.use_dora:  # prepared for compiled hot-swapping
            xa = F.linear(self.lora_dropout(x), a)  # (..., r)
            return y + F.linear(xa, b) * self.scaling.to(dtype)
        if not self.use_dora:
            if p > 0.0 and can_seed_dropout(x):
                # Seeded dropout: no dropped copy of x stays alive for backward (kernels/lora.py).
                return LoraUpdate.apply(x, y, a, b, self.scaling, p, draw_seed())
            # y + s·(x Aᵀ) Bᵀ as one addmm: the scale and the residual add ride in the GEMM epilogue,
            # so no (..., out) temporary is made besides the result.
            xa = F.linear(self.lora_dropout(x), a)  # (..., r)
            out = torch.addmm(y.reshape(-1, y.shape[-1]), xa.reshape(-1, xa.shape[-1]), b.t(), alpha=self.scaling)
            return out.view(y.shape)
        h = self.lora_dropout(x)
        lora = F.linear(F.linear(h, a) * self.scaling, b)  # (..., out)
        w = self._oi(get_weight(base_layer).to(dtype))  # (out, in)
        with torch.no_grad():  # DoRA §4.3: the norm is a constant in backward
            norm = self._row_norm(w, (b @ a) * self.scaling)
        scale = self.lora_magnitude_vector.weight.to(dtype) / norm  # (out,)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = getattr(base_layer, "bias", None)
            base_out = y if bias is None else y - bias
        else:
            base_out = F.linear(h, w)
        return y + (scale - 1) * base_out + scale * lora

    @staticmethod
    def mixed_forward(
        adapters: list[LoraLinear | None],
        index: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        base_layer: nn.Module,
        cache: dict,
    ) -> torch.Tensor | None:
        """Every row with its own adapter in two batched matmuls (BGMV-style); ``None`` asks for the grouped path.

        Args:
            adapters: the adapter of each distinct name (``None``: that name has no adapter here, or is ``__base__``).
            index: (B,) position in ``adapters`` of each row's adapter.
        """
        live = [a for a in adapters if a is not None]
        if any(a.use_dora or a.lora_B.bias is not None or (a.training and not isinstance(a.lora_dropout, nn.Identity))
               for a in live):
            return None
        a_stack, b_stack = _stacked(adapters, live, x.dtype, x.device, cache)
        rows = x.shape[0]
        x3 = x.reshape(rows, -1, x.shape[-1])  # (B, T, in)
        h = torch.bmm(x3, a_stack[index].transpose(1, 2))  # (B, T, r_max)
        out = torch.baddbmm(y.reshape(rows, -1, y.shape[-1]), h, b_stack[index].transpose(1, 2))  # (B, T, out)
        return out.view(y.shape)

    def _add_update(self, weight: torch.Tensor, sign: float) -> torch.Tensor:
        """weight ± s·B A, in place: one GEMM with the add in its epilogue when the dtypes agree (no delta tensor);
        otherwise the update is formed in the adapter's (fp32) dtype and added."""
        w = self._oi(weight)  # (out, in) view of the weight
        a, b = self.lora_A.weight.detach(), self.lora_B.weight.detach()
        scaling = float(self.scaling)
        if w.dtype == a.dtype:
            w.addmm_(b, a, alpha=sign * scaling)
        else:
            w.add_((b @ a).mul_(sign * scaling).to(w.dtype))
        return weight

    def merge(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        if self.lora_B.bias is not None and getattr(base_layer, "bias", None) is None:
            raise UnsupportedError(f"lora_bias cannot be merged into a {type(base_layer).__name__} without a bias; "
                                   "use the adapter unmerged")
        if not self.use_dora:
            return self._add_update(weight, 1.0)
        w = self._oi(weight)
        delta = self.delta_weight().detach().to(weight.dtype)
        scale = (self.lora_magnitude_vector.weight.detach().to(weight.dtype) / self._row_norm(w, delta))  # (out,)
        self._dora_merge_scale = scale
        w.add_(delta).mul_(scale[:, None])
        return weight

    def unmerge(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        if not self.use_dora:
            return self._add_update(weight, -1.0)
        if self._dora_merge_scale is None:
            raise RuntimeError("DoRA unmerge without a recorded merge scale")
        w = self._oi(weight)
        w.div_(self._dora_merge_scale[:, None]).sub_(self.delta_weight().detach().to(weight.dtype))
        self._dora_merge_scale = None
        return weight


def _stacked(adapters: list, live: list, dtype: torch.dtype, device: torch.device, cache: dict):
    """A as (n, r_max, in) and s·B as (n, out, r_max), zero for missing adapters and padded ranks.

    Cached while no adapter weight changes (parameter version counters) and gradients are off; with
    gradients on, the stacks are rebuilt in the graph so training through a mixed batch works.
    """
    params = [t for a in live for t in (a.lora_A.weight, a.lora_B.weight)]
    key = (dtype, device, tuple(id(a) for a in adapters))
    versions = tuple(t._version for t in params)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in params)
    if not grad and key in cache and cache[key][0] == versions:
        return cache[key][1]
    r_max = max(a.lora_A.weight.shape[0] for a in live)
    in_f, out_f = live[0].lora_A.weight.shape[1], live[0].lora_B.weight.shape[0]
    a_rows, b_rows = [], []
    for a in adapters:
        if a is None:
            a_rows.append(torch.zeros(r_max, in_f, dtype=dtype, device=device))
            b_rows.append(torch.zeros(out_f, r_max, dtype=dtype, device=device))
            continue
        r = a.lora_A.weight.shape[0]
        a_rows.append(F.pad(a.lora_A.weight.to(dtype), (0, 0, 0, r_max - r)))
        b_rows.append(F.pad(a.lora_B.weight.to(dtype) * a.scaling, (0, r_max - r)))
    stacks = (torch.stack(a_rows), torch.stack(b_rows))
    if not grad:
        cache.clear()
        cache[key] = (versions, stacks)
    return stacks


def _init_pair(a: torch.Tensor, b: torch.Tensor, init: bool | str, r: int) -> None:
    with torch.no_grad(), writable([a, b]):  # built under ZeRO-3's zero.Init: partitioned already
        if init == "eva":  # A keeps its layer's default draw until initialize_lora_eva_weights replaces it
            nn.init.zeros_(b)
            return
        if init == "gaussian":
            nn.init.normal_(a, std=1 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)
