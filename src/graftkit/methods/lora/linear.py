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

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError, UnsupportedError, UsageError
from ...kernels.lora import FusedLoraLinear, LoraUpdate, can_fuse, can_seed_dropout, draw_seed
from ...registry import is_loading
from ...weights import get_weight, is_quantized, linear_features, writable
from .config import _FROM_WEIGHT, _PREPARED, LoraConfig, moves_base


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


class LoraLinear(_BiasMerge, nn.Module):
    """LoRA (optionally DoRA) on a linear layer: ``nn.Linear`` or transformers ``Conv1D`` (fan_in_fan_out)."""

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
        # MiCA trains A only; B keeps the minor singular directions it was given.
        self.frozen_parameters: tuple[str, ...] = ("lora_B.weight",) if init == "mica" else ()
        if lora_bias:
            nn.init.zeros_(self.lora_B.bias)
        if init in ("loftq", "mica", "lora_ga", "corda") and is_loading():
            # A and B come from the file, fitted to the base the user saved (LoftQ: the quantized one; LoRA-GA:
            # the residual); nothing to compute
            _init_pair(self.lora_A.weight, self.lora_B.weight, True, r)
        elif moves_base(init) or init in _FROM_WEIGHT:
            if init not in ("olora", "orthogonal", "mica") and is_quantized(base_layer):
                hint = ("quantize the model after get_peft_model, or call graftkit.replace_lora_weights_loftq on a "
                        "model already in 4-bit" if init == "loftq" else
                        "initialise PiSSA on the full-precision model, then quantize the residual model (as HF peft "
                        "advises); OLoRA works on quantized bases")
                raise UnsupportedError(f"init_lora_weights={init!r} needs a float base layer, got a quantized "
                                       f"{type(base_layer).__name__}: {hint}")
            self._init_from_weight(init, weight, r, options, getattr(base_layer, _PREPARED.get(init, ""), None))
        else:
            _init_pair(self.lora_A.weight, self.lora_B.weight, init, r)
        self.use_dora = use_dora
        if use_dora:
            with torch.no_grad():  # W + s·BA: the weight the adapted layer computes (the base itself under PiSSA/OLoRA)
                w = self._oi((weight if self.pending_base is None else self.pending_base).to(kw["dtype"]))
                norm = self._row_norm(w, torch.zeros_like(w) if self.base_offset else self.delta_weight())
            self.lora_magnitude_vector = _Magnitude(self, norm)  # (out,)
        self._dora_merge_scale: torch.Tensor | None = None
        self._cast: tuple | None = None  # (key, A, B) in an activation dtype, for inference (see _weights)

    def _init_from_weight(self, init: str, weight: torch.Tensor, r: int, options: LoraConfig | None = None,
                          prepared: Any = None) -> None:
        """PiSSA: A, B from the top-r singular triplets (B A s = the principal part of W); OLoRA: from W's QR
        factors; orthogonal: two halves of a random orthogonal matrix, so that B A = 0 (Kaiming-scaled noise);
        MiCA: B the r minor left singular vectors, A zero; LoftQ: see :func:`_loftq`.
        The draws and factorizations follow HF peft's, so the same seed and weights give the same A and B."""
        with torch.no_grad():
            if init == "mica":
                w = self._oi(weight).to(torch.float32)
                if r > min(w.shape):
                    raise ConfigError(f"init_lora_weights='mica' needs r <= min(out, in) = {min(w.shape)} for a "
                                      f"layer of shape {tuple(w.shape)}, got r={r}; lower r (rank_pattern)")
                b = torch.linalg.svd(w, full_matrices=False)[0][:, -r:]
                a = torch.zeros(r, w.shape[1], dtype=w.dtype, device=w.device)
            elif init == "lora_ga":
                a, b = self._lora_ga(weight, prepared, r, (options.lora_ga_config if options else None) or {})
            elif init == "corda":
                a, b = self._corda(prepared, r)
            elif init == "loftq":
                loftq = (options.loftq_config if options else None) or {"loftq_bits": 4, "loftq_iter": 1}
                q, a, b = _loftq(self._oi(weight), r, self.scaling, loftq["loftq_bits"], loftq["loftq_iter"])
                self.pending_base = self._oi(q).to(weight.dtype).contiguous()
            elif init == "orthogonal":
                q, _ = torch.linalg.qr(torch.randn(r, r))
                out_features, in_features = self.lora_B.weight.shape[0], self.lora_A.weight.shape[1]
                a = torch.randn(in_features, r // 2).mm(q[0::2, :]).T / 10.0  # (r, in)
                b = torch.randn(r // 2, out_features).T.mm(q[1::2, :]) / 10.0  # (out, r)
            else:
                w = self._oi(weight).to(torch.float32)  # (out, in)
                if init == "olora":
                    q, rr = torch.linalg.qr(w)
                    a, b = rr[:r], q[:, :r]
                else:
                    if init == "pissa":
                        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
                        u, sv, vh = u[:, :r], sv[:r], vh[:r]
                    else:
                        u, sv, v = torch.svd_lowrank(w, q=r, niter=int(init.rsplit("_", 1)[1]))
                        vh = v.T
                    root = torch.sqrt(sv / self.scaling)  # s·B A = U_r S_r V_rᵀ
                    a, b = root[:, None] * vh, u * root[None, :]
            self.lora_A.weight.copy_(a.contiguous())
            self.lora_B.weight.copy_(b.contiguous())
        if moves_base(init):
            self.base_offset = (self.lora_A.weight.detach().clone(), self.lora_B.weight.detach().clone())

    def _lora_ga(self, weight: torch.Tensor, grad: torch.Tensor | None, r: int,
                 settings: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """LoRA-GA (Wang et al. 2024): A and B from the top 2r singular directions of the weight's gradient, so the
        first steps follow full fine-tuning's; the base gives up s·B A (``base_offset``). Randomized SVD and the
        scale rules as the ecosystem computes them, so the same seed and gradient give the same A and B."""
        if grad is None:
            raise UsageError("init_lora_weights='lora_ga' needs the weights' gradients: call "
                             "graftkit.preprocess_loraga(model, config, train_step) before get_peft_model")
        g = self._oi(grad.to(torch.float32))
        u, sv, v = torch.svd_lowrank(g, q=min(4 * r, min(g.shape)), niter=4)
        u, sv, vh = u[:, :2 * r], sv[:2 * r], v.T[:2 * r]
        direction = settings.get("direction", "ArB2r")
        if direction == "ArBr":
            pick_a, pick_b = slice(1, 2 * r, 2), slice(0, 2 * r, 2)
        elif direction == "A2rBr":
            pick_a, pick_b = slice(r, 2 * r), slice(0, r)
        elif direction == "ArB2r":
            pick_a, pick_b = slice(0, r), slice(r, 2 * r)
        else:  # random: one draw of r of the 2r directions for both
            pick_a = pick_b = torch.randperm(2 * r)[:r]
        a, sv_b = vh[pick_a], sv[pick_b]
        b = u[:, pick_b] * sv_b[None, :]
        scale = settings.get("scale", "stable")
        if scale == "stable":
            b = b * (g.shape[0] ** 0.25 / settings.get("stable_gamma", 16) ** 0.5)
        elif scale == "weight_svd":
            top = torch.svd_lowrank(self._oi(weight).to(torch.float32), q=r, niter=4)[1][0]
            if sv_b[0] > 0:
                b = b * (top / sv_b[0])
        elif scale == "gd_scale":
            a, b = a / self.scaling, b / self.scaling
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        return a.to(dtype).to(torch.float32), b.to(dtype).to(torch.float32)

    def _corda(self, eigens: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
               r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """CorDA (Yang et al. 2024): s·B A is the part (S, U, V) of W's context-oriented decomposition that
        :func:`preprocess_corda` kept; the base gives it up (``base_offset``)."""
        if eigens is None:
            raise UsageError("init_lora_weights='corda' needs the layers' input statistics: call "
                             "graftkit.preprocess_corda(model, config, run_model) before get_peft_model")
        sv, u, v = (t.to(torch.float32) for t in eigens)
        out_features, in_features = self.lora_B.weight.shape[0], self.lora_A.weight.shape[1]
        if sv.shape != (r,) or u.shape != (out_features, r) or v.shape != (in_features, r):
            raise ConfigError(f"the CorDA decomposition holds rank {sv.shape[0]} for a ({out_features}, {in_features}) "
                              f"layer, the adapter wants rank {r}: run preprocess_corda with the same model and config "
                              "(a cache_file built for another rank must be deleted)")
        root = torch.sqrt(sv / self.scaling)
        return v.T * root[:, None], u * root[None, :]

    def shift_base(self, weight: torch.Tensor, sign: float) -> torch.Tensor:
        """weight + sign · s·B₀A₀ (the attach-time offset), in place."""
        a0, b0 = self.base_offset
        w = self._oi(weight)
        w.add_((b0 @ a0).mul_(sign * self.scaling).to(w.dtype))
        return weight

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


def _loftq(weight: torch.Tensor, r: int, scaling: float, bits: int, iters: int,
           quantized: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ (Li et al. 2023): Q, the values W takes in the quantized format, and A, B with s·B A the rank-r part of
    W - Q, alternating ``iters`` times (Q = quant(W - s·B A), then s·B A = SVD_r(W - Q)). ``quantized``: Q is given
    (a base already quantized), one fit. The factors are split so that s·B A (not B A) is the fitted update: the
    adapted layer starts at Q + SVD_r(W - Q) whatever ``lora_alpha`` is."""
    from ...weights import quantized_values

    w = weight.to(torch.float32)
    q = quantized_values(w, bits) if quantized is None else quantized.to(torch.float32)
    for step in range(1 if quantized is not None else iters):
        u, sv, vh = torch.linalg.svd(w - q, full_matrices=False)
        root = torch.sqrt(sv[:r] / scaling)
        a, b = root[:, None] * vh[:r], u[:, :r] * root[None, :]
        if step + 1 < iters and quantized is None:
            q = quantized_values(w - scaling * (b @ a), bits)
    return q, a, b


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
