"""LoRA: low-rank adaptation (Hu et al. 2021), with rsLoRA scaling and DoRA (Liu et al. 2024).

::

            ┌──────────── W (frozen) ────────────┐
    x ──────┤                                    ├──(+)──► y = W x + s · B A x
            └─ dropout ─► A (r×in) ─► B (out×r) ─┘
                                       s = alpha / r   (rsLoRA: alpha / sqrt(r))

A starts random and B at zero, so training starts from the base model. Merging writes W + s·BA into the
base weight. DoRA splits the adapted weight into a direction and a learned magnitude ``m`` per output:

    W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_row        (the norm is treated as a constant in backward, §4.3)

Forward adds ``(m/‖·‖ − 1) ⊙ (W x) + (m/‖·‖) ⊙ s·B A x`` to the base output, so a quantized base is still
called as it is. Adapters on ``nn.Embedding`` look up rows of Aᵀ; on ``nn.Conv1d/2d/3d`` A is a conv with the
base's kernel and B a 1×1 conv.

Parameter names (``lora_A.weight``, ``lora_embedding_A``, ``lora_magnitude_vector`` ...) are the on-disk
tensor names of the ecosystem's format.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ALL_LINEAR, PeftConfig, PeftType, TunerConfig, check_regex
from ..errors import CheckpointError, ConfigError, PeftWarning, TargetError, UnsupportedError, UsageError
from ..experts import Pairs, fused_experts, grouped_mm, run_experts
from ..inject import inject
from ..kernels.lora import FusedLoraLinear, LoraUpdate, can_fuse, can_seed_dropout, draw_seed
from ..layer import AdaptedLayer, ModulesToSave, Nest
from ..merging import COMBINATIONS, combine
from ..registry import Method, is_loading, register
from ..weights import get_weight, is_quantized, linear_features, set_weight, writable

_INIT_CHOICES = (True, False, "gaussian", "pissa", "pissa_niter_<n>", "olora", "orthogonal", "loftq", "mica",
                 "lora_ga", "corda", "eva")
_NOT_YET: tuple[str, ...] = ()  # HF peft inits graftkit does not implement yet
# inits computed from the base weight, its gradient, its input statistics or noise
_FROM_WEIGHT = ("pissa", "olora", "orthogonal", "loftq", "mica", "lora_ga", "corda")
# What a preprocessing call leaves on each target layer for the init to use (then dropped): preprocess_loraga the
# averaged weight gradient, preprocess_corda the (S, U, V) of the context-oriented decomposition.
_PREPARED = {"lora_ga": "_graftkit_loraga_grad", "corda": "_graftkit_corda_eigens"}


def _known_init(init: object) -> bool:
    if isinstance(init, bool):
        return True
    return isinstance(init, str) and (init in ("gaussian", "eva", *_FROM_WEIGHT)
                                      or re.fullmatch(r"pissa_niter_\d+", init) is not None)


@dataclasses.dataclass
class LoftQConfig:
    """LoftQ's settings (``LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(...))``).

    Args:
        loftq_bits: 4 (NF4) or 8 (LLM.int8()): the format the base will be quantized to.
        loftq_iter: alternations of quantizing W - BA and refitting BA to W - Q.
    """

    loftq_bits: int = 4
    loftq_iter: int = 1


@dataclasses.dataclass
class LoraGAConfig:
    """LoRA-GA's settings (``LoraConfig(init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(...))``, after
    :func:`preprocess_loraga`).

    Args:
        direction: which of the gradient's top 2r singular directions go to A and B: ``"ArB2r"`` (A the first r,
            B the next r), ``"A2rBr"`` (the other way), ``"ArBr"`` (alternating) or ``"random"``.
        scale: ``"stable"`` (B times out^¼ / √stable_gamma), ``"weight_svd"`` (B matched to W's top singular
            value), ``"gd_scale"`` (both divided by the LoRA scale) or ``"unit"``.
        stable_gamma: γ of the stable scale.
    """

    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: int = 16


@dataclasses.dataclass
class CordaConfig:
    """CorDA's settings (``LoraConfig(init_lora_weights="corda", corda_config=CordaConfig(...))``, after
    :func:`preprocess_corda`).

    Args:
        corda_method: ``"ipm"`` (instruction-previewed: the adapter takes the r directions the data uses most) or
            ``"kpm"`` (knowledge-preserving: the r it uses least, keeping the rest in the frozen base).
        cache_file: where the decomposition is read from if present, else written (a ``torch.save`` dict of
            tensors, the same keys as HF peft's, so caches move between the two).
        covariance_file: the same for the input covariances.
        use_float16_for_covariance: accumulate the covariances in the inputs' half precision (less memory).
        verbose: print each layer as it is decomposed.
        prune_temporary_fields: kept for the file format; graftkit never leaves temporary fields on layers.
    """

    cache_file: str | None = None
    covariance_file: str | None = None
    corda_method: str = "ipm"
    verbose: bool = False
    use_float16_for_covariance: bool = False
    prune_temporary_fields: bool = True


@dataclasses.dataclass
class EvaConfig:
    """EVA's settings (``LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(...))``, then
    :func:`initialize_lora_eva_weights`).

    Args:
        rho: each layer may take up to round(rho·r) components; the ranks are then redistributed by explained
            variance within the total budget (rho=1: every layer keeps r).
        tau: a component has converged when its cosine similarity to the previous batch's is at least tau.
        use_label_mask: leave out positions whose label is ``label_mask_value``.
        whiten: divide each component by the square root of its singular value.
        adjust_scaling_factors: scale lora_alpha with a layer's new rank (alpha · new_r / r), so s stays put.
    """

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True


def moves_base(init: object) -> bool:
    """Whether the init moves a part of the base weight into the adapter (PiSSA, OLoRA, LoRA-GA, CorDA)."""
    return isinstance(init, str) and (init.startswith("pissa") or init in ("olora", "lora_ga", "corda"))


@dataclasses.dataclass
class LoraConfig(TunerConfig):
    """Config of a LoRA adapter (field names and meanings as in the HF ecosystem).

    Args:
        r: rank of the update BA.
        lora_alpha: scale numerator: the update is multiplied by ``lora_alpha / r``.
        lora_dropout: dropout on the adapter's input (0 means no dropout and no copy of x).
        fan_in_fan_out: the base weight is stored (in, out), as transformers' ``Conv1D`` does; detected
            from the layer type, so this only needs setting for custom layers.
        bias: ``"none"``, ``"all"`` (train every bias of the model) or ``"lora_only"`` (biases of adapted layers).
        use_rslora: scale by ``lora_alpha / sqrt(r)`` (rank-stabilised LoRA).
        use_dora: weight-decomposed LoRA (a learned magnitude per output feature).
        init_lora_weights: ``True`` (A Kaiming-uniform, B zero), ``"gaussian"`` (A normal with std 1/r, B zero),
            ``False`` (both random: the adapter changes the output from the start; for tests), ``"pissa"`` /
            ``"pissa_niter_N"`` / ``"olora"`` (the base's principal part moves into the adapter), ``"orthogonal"``,
            ``"loftq"`` (the base becomes its 4/8-bit values and s·BA their low-rank error; ``loftq_config``) or
            ``"mica"`` (B: the r minor left singular vectors of W, frozen; A zero and trained).
        loftq_config: ``{"loftq_bits": 4 or 8, "loftq_iter": n}`` (or a :class:`LoftQConfig`) for
            ``init_lora_weights="loftq"``; filled with 4 bits, 1 iteration when left empty.
        rank_pattern / alpha_pattern: per-module ``r`` / ``lora_alpha``; keys are regexes matched against the
            end of the module path.
        lora_bias: give B a bias (trained, zero at the start); merging adds s·b_B to the base bias.
        target_parameters: parameters adapted directly (names matched against the end of ``<module>.<param>``):
            the fused 3-D expert weights of mixture-of-experts models (one low-rank update per expert) or any 2-D
            weight a module uses without a linear layer (a router's ``gate.weight``).
        trainable_token_indices: token ids whose embedding rows are trained in full (new special tokens): a list for
            the input embedding, or ``{module name: ids}``; a tied output layer follows the input embedding.
        ensure_weight_tying: on a model whose output layer is tied to its input embedding, keep what the adapter
            trains of the two tied as well: with either in ``modules_to_save``, the embedding's trained copy is the
            head's too; with either in ``target_modules``, the embedding gets the LoRA update and the head uses it,
            transposed. The config is rewritten to name the embedding (as the ecosystem does). Without tied
            embeddings, or with neither named, it changes nothing (warned).
    """

    peft_type: str | PeftType | None = PeftType.LORA
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    lora_bias: bool = False
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    target_parameters: list[str] | None = None
    loftq_config: dict[str, int] = dataclasses.field(default_factory=dict)
    lora_ga_config: dict[str, Any] | None = None
    corda_config: dict[str, Any] | None = None
    eva_config: dict[str, Any] | None = None
    ensure_weight_tying: bool = False

    # How the weights started says nothing about what trained weights compute.
    bookkeeping_fields: ClassVar[frozenset[str]] = TunerConfig.bookkeeping_fields | {"init_lora_weights"}
    peft_only_fields: ClassVar[dict[str, Any]] = {
        "alora_invocation_tokens": None,
        "arrow_config": None,
        "kasa_config": None,
        "layer_replication": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "monteclora_config": None,
        "qalora_group_size": 16,
        "use_bdlora": None,
        "use_qalora": False,
        "velora_config": None,
    }

    def __post_init__(self) -> None:
        if isinstance(self.loftq_config, LoftQConfig):
            self.loftq_config = dataclasses.asdict(self.loftq_config)
        if isinstance(self.lora_ga_config, LoraGAConfig):
            self.lora_ga_config = dataclasses.asdict(self.lora_ga_config)
        if isinstance(self.corda_config, CordaConfig):
            self.corda_config = dataclasses.asdict(self.corda_config)
        if isinstance(self.eva_config, EvaConfig):
            self.eva_config = dataclasses.asdict(self.eva_config)
        super().__post_init__()
        self.peft_type = PeftType.LORA
        if self.r <= 0:
            raise ConfigError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"LoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if not _known_init(self.init_lora_weights):
            later = " (an HF peft initialisation graftkit does not implement yet)" \
                if self.init_lora_weights in _NOT_YET else ""
            raise UnsupportedError(
                f"LoraConfig.init_lora_weights={self.init_lora_weights!r} is not implemented in graftkit{later}; "
                f"use one of {list(_INIT_CHOICES)}"
            )
        tokens = self.trainable_token_indices
        groups = tokens.values() if isinstance(tokens, dict) else [tokens] if tokens is not None else []
        for ids in groups:
            if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
                raise ConfigError(f"LoraConfig.trainable_token_indices needs distinct non-negative token ids, got "
                                  f"{tokens!r}")
        if self.target_parameters:
            clash = [f for f, bad in (("lora_dropout", self.lora_dropout), ("use_dora", self.use_dora),
                                      ("lora_bias", self.lora_bias), ("fan_in_fan_out", self.fan_in_fan_out)) if bad]
            if clash:
                raise UnsupportedError(f"LoraConfig.target_parameters does not work with {clash} (nor in HF peft): "
                                       "an update applied to a weight has no input to drop out or bias to add")
        if self.lora_bias and self.use_dora:
            raise UnsupportedError("LoraConfig: lora_bias with use_dora is not supported in graftkit; use one of them")
        if self.init_lora_weights == "loftq":
            self.loftq_config = {"loftq_bits": 4, "loftq_iter": 1, **(self.loftq_config or {})}
            bits, iters = self.loftq_config["loftq_bits"], self.loftq_config["loftq_iter"]
            if bits not in (4, 8) or not isinstance(iters, int) or iters < 1 or set(self.loftq_config) - {
                    "loftq_bits", "loftq_iter"}:
                raise ConfigError(f"LoraConfig.loftq_config needs loftq_bits 4 or 8 and loftq_iter >= 1 (and no other "
                                  f"keys), got {self.loftq_config}")
        elif self.init_lora_weights == "lora_ga":
            ga = {**dataclasses.asdict(LoraGAConfig()), **(self.lora_ga_config or {})}
            if ga["direction"] not in ("ArBr", "A2rBr", "ArB2r", "random") or ga["scale"] not in (
                    "stable", "weight_svd", "gd_scale", "unit") or set(ga) - {"direction", "scale", "stable_gamma"}:
                raise ConfigError(f"LoraConfig.lora_ga_config={self.lora_ga_config} is not valid: direction is one of "
                                  "ArBr, A2rBr, ArB2r, random; scale one of stable, weight_svd, gd_scale, unit")
            self.lora_ga_config = ga
        elif self.init_lora_weights == "corda":
            corda = {**dataclasses.asdict(CordaConfig()), **(self.corda_config or {})}
            if corda["corda_method"] not in ("ipm", "kpm") or set(corda) - set(dataclasses.asdict(CordaConfig())):
                raise ConfigError(f"LoraConfig.corda_config={self.corda_config} is not valid: corda_method is 'ipm' or "
                                  f"'kpm'; keys are {sorted(dataclasses.asdict(CordaConfig()))}")
            self.corda_config = corda
        elif self.init_lora_weights == "eva":
            eva = {**dataclasses.asdict(EvaConfig()), **(self.eva_config or {})}
            if set(eva) - set(dataclasses.asdict(EvaConfig())) or not eva["rho"] >= 1.0 or not 0 < eva["tau"] <= 1:
                raise ConfigError(f"LoraConfig.eva_config={self.eva_config} is not valid: rho >= 1, 0 < tau <= 1, keys "
                                  f"{sorted(dataclasses.asdict(EvaConfig()))}")
            self.eva_config = eva
        if self.loftq_config and self.init_lora_weights != "loftq":
            raise ConfigError(f"LoraConfig.loftq_config={self.loftq_config} is set but init_lora_weights is "
                              f"{self.init_lora_weights!r}; set init_lora_weights='loftq' or drop loftq_config")
        if self.init_lora_weights == "orthogonal":
            odd = sorted({r for r in (self.r, *self.rank_pattern.values()) if r % 2})
            if odd:
                raise ConfigError(f"init_lora_weights='orthogonal' needs even ranks (it splits an orthogonal matrix "
                                  f"in two halves), got r={odd}")
        self._check_patterns()

    def _check_patterns(self) -> None:
        for key, value in self.rank_pattern.items():
            check_regex(key, f"LoraConfig.rank_pattern key {key!r}")
            if value <= 0:
                raise ConfigError(f"LoraConfig.rank_pattern[{key!r}] must be a positive integer, got {value!r}")
        for key in self.alpha_pattern:
            check_regex(key, f"LoraConfig.alpha_pattern key {key!r}")

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """``r`` and ``lora_alpha`` for one module path, after ``rank_pattern`` / ``alpha_pattern``."""
        return (
            _pattern_value(self.rank_pattern, module_name, self.r),
            _pattern_value(self.alpha_pattern, module_name, self.lora_alpha),
        )


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


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


class LoraEmbedding(nn.Module):
    """LoRA (optionally DoRA) on ``nn.Embedding``: the update for token t is s · B A[:, t].

    With DoRA the magnitude is one value per embedding dimension: m / ‖W + s·(BA)ᵀ‖ over the vocabulary scales
    each dimension of the adapted embedding."""

    def __init__(self, base_layer: nn.Embedding, r: int, alpha: float, use_rslora: bool, init: bool | str,
                 use_dora: bool = False) -> None:
        super().__init__()
        weight = base_layer.weight
        kw = {"device": weight.device, "dtype": _adapter_dtype(weight)}
        num, dim = weight.shape
        self.lora_embedding_A = nn.Parameter(torch.empty(r, num, **kw))
        self.lora_embedding_B = nn.Parameter(torch.empty(dim, r, **kw))
        self.scaling = _scaling(r, alpha, use_rslora)
        # MiCA trains A only; B keeps the minor singular directions of the embedding matrix (dim, num) it was given.
        self.frozen_parameters: tuple[str, ...] = ("lora_embedding_B",) if init == "mica" else ()
        with torch.no_grad():
            if init is False:
                nn.init.normal_(self.lora_embedding_A)
                nn.init.normal_(self.lora_embedding_B)
            elif init == "mica" and not is_loading():
                w = weight.detach().to(torch.float32).T  # the projection the lookup computes: (dim, num)
                if r > min(w.shape):
                    raise ConfigError(f"init_lora_weights='mica' needs r <= min(num_embeddings, embedding_dim) = "
                                      f"{min(w.shape)} for an embedding of shape {tuple(weight.shape)}, got r={r}; "
                                      "lower r (rank_pattern)")
                nn.init.zeros_(self.lora_embedding_A)
                self.lora_embedding_B.copy_(torch.linalg.svd(w, full_matrices=False)[0][:, -r:])
            else:  # A is the lookup table here, so it is the zero half
                nn.init.zeros_(self.lora_embedding_A)
                nn.init.normal_(self.lora_embedding_B)
        self.use_dora = use_dora
        self._dora_merge_scale: torch.Tensor | None = None
        if use_dora:
            with torch.no_grad():
                norm = self._column_norm(weight.to(kw["dtype"]), self.delta_weight())
            self.lora_magnitude_vector = _Magnitude(self, norm)  # (dim,)

    @staticmethod
    def _column_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(weight + delta, dim=0)  # (dim,): over the vocabulary

    def delta_weight(self) -> torch.Tensor:
        """s · (B A)ᵀ as (num_embeddings, dim)."""
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling

    def forward(self, x: torch.Tensor, y: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        a = self.lora_embedding_A.to(y.dtype)
        b = self.lora_embedding_B.to(y.dtype)
        h = F.embedding(
            x, a.T, base_layer.padding_idx, base_layer.max_norm, base_layer.norm_type,
            base_layer.scale_grad_by_freq, base_layer.sparse,
        )  # (..., r)
        update = (h * self.scaling) @ b.T  # (..., dim)
        if not self.use_dora:
            return y + update
        with torch.no_grad():  # DoRA §4.3: the norm is a constant in backward
            norm = self._column_norm(base_layer.weight.to(y.dtype), ((b @ a).T * self.scaling))
        scale = self.lora_magnitude_vector.weight.to(y.dtype) / norm  # (dim,)
        return scale * (y + update)

    def merge(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        delta = self.delta_weight().detach().to(weight.dtype)
        if not self.use_dora:
            return weight.add_(delta)
        scale = self.lora_magnitude_vector.weight.detach().to(weight.dtype) / self._column_norm(weight, delta)
        self._dora_merge_scale = scale
        return weight.add_(delta).mul_(scale[None, :])

    def unmerge(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        delta = self.delta_weight().detach().to(weight.dtype)
        if not self.use_dora:
            return weight.sub_(delta)
        if self._dora_merge_scale is None:
            raise RuntimeError("DoRA unmerge without a recorded merge scale")
        weight.div_(self._dora_merge_scale[None, :]).sub_(delta)
        self._dora_merge_scale = None
        return weight


class TrainableTokens(nn.Module):
    """Trains the rows of a few token ids of an embedding (or of an output layer) in full.

    On an ``nn.Embedding`` the trained rows replace the looked-up vectors of those ids; on a linear output layer (a
    head tied to the input embedding) they replace the weight rows that give those ids' logits. A tied head shares
    the embedding adapter's rows (``shared``) and saves nothing of its own. Merging writes the rows into the weight;
    unmerging writes the original rows back.
    """

    def __init__(self, base_layer: nn.Module, indices: list[int], shared: TrainableTokens | None = None,
                 nested: bool = True, init: bool = True) -> None:
        """``nested``: LoRA's ``trainable_token_indices``, whose layers the ecosystem nests one level deeper
        (``<layer>.token_adapter``, a :class:`Nest`) and whose tied head saves nothing; otherwise the standalone
        method, whose tied head saves the shared rows too. ``init=False`` draws the rows from N(0, 1) (for tests)."""
        super().__init__()
        weight = base_layer.weight
        if not indices or min(indices) < 0 or max(indices) >= weight.shape[0]:
            bad = sorted(i for i in indices if not 0 <= i < weight.shape[0]) or "none"
            raise ConfigError(f"token indices {bad} are out of range for a {type(base_layer).__name__} of "
                              f"{weight.shape[0]} tokens (give at least one id in [0, {weight.shape[0]}))")
        self._shared = [shared] if shared is not None else []  # a list: not a submodule, nothing saved twice
        self.nested = nested
        self.register_buffer("indices", torch.tensor(indices, dtype=torch.long, device=weight.device),
                             persistent=False)
        self.register_buffer("original", weight.detach()[self.indices].clone(), persistent=False)  # (n, dim)
        if shared is None:
            rows = self.original.to(_adapter_dtype(weight)).clone()
            if not init:
                rows.normal_()
            self.trainable_tokens_delta = nn.Parameter(rows)  # (n, dim)
        else:
            self.trainable_tokens_delta = shared.trainable_tokens_delta  # the same tensor, as tied weights are
        self._slots: tuple | None = None

    def rows(self) -> torch.Tensor:
        return self.trainable_tokens_delta  # (n, dim)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.nested and self._shared else {"trainable_tokens_delta": self.rows()}

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for src in tensors.values():
                self.rows().copy_(src.to(device=self.rows().device, dtype=self.rows().dtype))

    def _slot(self, ids: torch.Tensor, vocab: int) -> torch.Tensor:
        """Each id's row among the trained ones, or -1."""
        if self._slots is None or self._slots[0] != (vocab, ids.device):
            table = torch.full((vocab,), -1, dtype=torch.long, device=ids.device)
            table[self.indices.to(ids.device)] = torch.arange(len(self.indices), device=ids.device)
            self._slots = ((vocab, ids.device), table)
        return self._slots[1][ids]

    def forward(self, x: torch.Tensor, y: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        rows = self.rows().to(y.dtype)
        if isinstance(base_layer, nn.Embedding):
            slot = self._slot(x, base_layer.num_embeddings)  # (...,)
            return torch.where((slot >= 0)[..., None], rows[slot.clamp(min=0)], y)
        logits = x @ rows.T  # (..., n): the trained rows' logits
        bias = getattr(base_layer, "bias", None)
        if bias is not None:
            logits = logits + bias[self.indices].to(y.dtype)
        return y.index_copy(y.dim() - 1, self.indices, logits)

    def merge(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return weight.index_copy_(0, self.indices, self.rows().detach().to(weight.dtype))

    def unmerge(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return weight.index_copy_(0, self.indices, self.original.to(weight.dtype))


def add_trainable_tokens(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    """Wrap the layers ``trainable_token_indices`` names (a list: the input embedding) with :class:`TrainableTokens`;
    an output layer tied to a wrapped embedding shares its rows, as the tied weights are one tensor."""
    from ..inject import _name_matches, iter_modules

    tokens = config.trainable_token_indices
    if tokens is None:
        return
    paths = {path: module for path, module in iter_modules(model) if path}
    if isinstance(tokens, dict):
        wanted = []
        for name, ids in tokens.items():
            found = [p for p in paths if _name_matches(p, [name])]
            if not found:
                raise TargetError(f"trainable_token_indices names '{name}', which matches no module of "
                                  f"{type(model).__name__}")
            wanted += [(p, ids) for p in found]
    else:
        wanted = [(input_embedding_path(model, "trainable_token_indices={'embed_tokens': [...]}"), tokens)]
    wrap_token_rows(model, wanted, adapter_name, nested=True, init=True)


def _base_of(module: nn.Module) -> nn.Module:
    module = module.inner if isinstance(module, Nest) else module
    return module.base_layer if isinstance(module, AdaptedLayer) else module


def input_embedding_path(model: nn.Module, hint: str) -> str:
    """The module path of ``model``'s input embedding (wrapped or not).

    Raises:
        TargetError: the model has none it can name; ``hint`` says how to name the layer instead.
    """
    from ..inject import iter_modules

    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    found = [p for p, m in iter_modules(model) if p and embedding is not None and (m is embedding
                                                                                   or _base_of(m) is embedding)]
    if not found:
        raise TargetError(f"{type(model).__name__} has no input embedding to find; name the layer: {hint}")
    return found[0]


def wrap_token_rows(model: nn.Module, wanted: list[tuple[str, list[int]]], adapter_name: str, nested: bool,
                    init: bool) -> None:
    """Give each module path in ``wanted`` a :class:`TrainableTokens` adapter for its token ids; an output layer
    tied to a wrapped embedding (one weight tensor) gets an adapter sharing those rows.

    Raises:
        TargetError: a path is not an embedding or linear output layer. UnsupportedError: it already holds
        ``adapter_name`` (e.g. as a LoRA target).
    """
    from ..inject import iter_modules

    created: dict[int, TrainableTokens] = {}
    for path, ids in wanted:
        module = model.get_submodule(path)
        base = _base_of(module)
        if not isinstance(base, (nn.Embedding, nn.Linear)):
            raise TargetError(f"trainable tokens: '{path}' is a {type(base).__name__}, not an embedding or linear "
                              "output layer")
        module = _token_layer(model, path, nested)
        if adapter_name in module.adapters:
            raise UnsupportedError(f"'{path}' is both a LoRA target and in trainable_token_indices; pick one")
        adapter = TrainableTokens(base, list(ids), nested=nested, init=init)
        module.add(adapter_name, adapter)
        created[id(base.weight)] = adapter
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = _base_of(head) if head is not None else None
    if head is not None and id(getattr(head, "weight", None)) in created and \
            not any(_base_of(model.get_submodule(p)) is head for p, _ in wanted):
        path = next(p for p, m in iter_modules(model) if p and (m is head or _base_of(m) is head))
        shared = created[id(head.weight)]
        adapter = TrainableTokens(head, shared.indices.tolist(), shared=shared, nested=nested)
        _token_layer(model, path, nested).add(adapter_name, adapter)


def _token_layer(model: nn.Module, path: str, nested: bool) -> AdaptedLayer:
    """The adapted layer trainable tokens join at ``path``: the one there (also inside a :class:`Nest`), or a new
    one (nested: inside a new ``Nest`` as ``token_adapter``, the ecosystem's layout for LoRA's tokens)."""
    from ..inject import set_submodule

    module = model.get_submodule(path)
    if isinstance(module, Nest):
        return module.inner
    if isinstance(module, AdaptedLayer):
        return module
    layer = AdaptedLayer(module)
    layer.train(module.training)
    set_submodule(model, path, Nest("token_adapter", layer) if nested else layer)
    return layer


class LoraMultiheadAttention(nn.Module):
    """LoRA on ``nn.MultiheadAttention``: one update on the packed q/k/v input projection (B: (3·embed, r)) and one on
    the output projection, laid out as the ecosystem lays them out: this adapter holds the input projection's pair
    (``<path>.lora_A.<name>.weight``), and the output projection is an adapted layer of its own inside the base
    (``<path>.base_layer.out_proj.lora_A.<name>.weight``), put there when this adapter joins its layer.

    The module's forward reads ``in_proj_weight`` and ``out_proj.weight`` directly (neither projection has a forward
    of its own), so the adapter substitutes W + s·B A for both (``AdaptedLayer`` runs the module with
    ``torch.func.functional_call``). Merging writes the input projection's update; the output projection's layer
    merges its own.
    """

    def __init__(self, base_layer: nn.MultiheadAttention, r: int, alpha: float, use_rslora: bool,
                 init: bool | str) -> None:
        super().__init__()
        weight = base_layer.in_proj_weight
        kw = {"device": weight.device, "dtype": _adapter_dtype(weight)}
        embed = base_layer.embed_dim
        self.lora_A = nn.Linear(embed, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, 3 * embed, bias=False, **kw)
        self.scaling = _scaling(r, alpha, use_rslora)
        _init_pair(self.lora_A.weight, self.lora_B.weight, init, r)
        out = base_layer.out_proj
        # Not a submodule: it joins the output projection's own layer (see attached).
        self.__dict__["out_lora"] = LoraLinear(out.base_layer if isinstance(out, AdaptedLayer) else out, r, alpha,
                                               0.0, use_rslora, False, init, False)

    def attached(self, layer: AdaptedLayer, name: str) -> None:
        """Joined ``layer`` as adapter ``name``: the output projection becomes an adapted layer holding its part."""
        out = layer.base_layer.out_proj
        if not isinstance(out, AdaptedLayer):
            out = AdaptedLayer(out)
            out.train(layer.training)
            layer.base_layer.out_proj = out
        out.add(name, self.out_lora)

    def detached(self, layer: AdaptedLayer, name: str) -> None:
        """Left ``layer``: its output-projection part leaves too, and an output projection left bare is plain again."""
        out = layer.base_layer.out_proj
        if isinstance(out, AdaptedLayer) and name in out.adapters:
            out.remove(name)
            if not out.adapters:
                layer.base_layer.out_proj = out.base_layer

    def substitute(self, base_layer: nn.Module, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        d_in = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        w_in = params.get("in_proj_weight", base_layer.in_proj_weight)
        out = dict(params)
        out["in_proj_weight"] = w_in + d_in.to(w_in.dtype)
        proj = base_layer.out_proj
        key = "out_proj.base_layer.weight"
        if isinstance(proj, AdaptedLayer) and key not in out and not proj.disabled:
            live = [n for n in proj.active if n in proj.adapters and n not in proj.merged_adapters]
            if live:  # the output projection's own adapters, once for all of this layer's
                w_out = proj.base_layer.weight
                out[key] = w_out + sum(proj.adapters[n].delta_weight().to(w_out.dtype) for n in live)
        return out

    def merge_params(self, base_layer: nn.Module, sign: float) -> None:
        d_in = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        with torch.no_grad():
            base_layer.in_proj_weight.add_(d_in.to(base_layer.in_proj_weight.dtype), alpha=sign)

    def forward(self, x: Any, y: Any, base_layer: nn.Module) -> Any:
        return y  # the substituted weights did the work


class _ParameterUpdate(nn.Module):
    """The low-rank update of one parameter: 2-D (out, in), or 3-D with one update per expert, as the ecosystem
    stores it: A (r·E, in) holds expert e's rows at [e·r, (e+1)·r); B (out, r·E) holds its columns at e, E+e, ..."""

    def __init__(self, param: torch.Tensor, transposed: bool, r: int, scaling: float, init: bool | str) -> None:
        super().__init__()
        self.scaling = scaling
        if param.dim() == 3:
            experts, first, second = param.shape
            in_features, out_features = (first, second) if transposed else (second, first)
        else:
            experts, (out_features, in_features) = 1, param.shape
        self.experts, self.transposed, self.r = experts, transposed, r
        kw = {"device": param.device, "dtype": _adapter_dtype(param)}
        self.lora_A = nn.Linear(in_features, r * experts, bias=False, **kw)
        self.lora_B = nn.Linear(r * experts, out_features, bias=False, **kw)
        _init_pair(self.lora_A.weight, self.lora_B.weight, init, r)

    def delta(self) -> torch.Tensor:
        """s · ΔW in the parameter's own layout."""
        a, b = self.lora_A.weight, self.lora_B.weight
        if self.experts == 1:
            return (b @ a) * self.scaling  # (out, in)
        a3 = a.reshape(self.experts, self.r, a.shape[-1])  # (E, r, in)
        b3 = b.reshape(b.shape[0], self.r, self.experts)  # (out, r, E)
        pattern = "ore,eri->eio" if self.transposed else "ore,eri->eoi"
        return torch.einsum(pattern, b3, a3) * self.scaling

    def routed_delta(self, x: torch.Tensor, pairs: Pairs) -> torch.Tensor:
        """s · ΔWₑ x for rows ``x`` (S, in) sorted by expert (``pairs``): two grouped GEMMs through rank r, so the
        cost follows the rows each expert gets."""
        a, b = self.lora_A.weight, self.lora_B.weight
        a3 = a.reshape(self.experts, self.r, a.shape[-1]).transpose(1, 2)  # (E, in, r)
        b3 = b.reshape(b.shape[0], self.r, self.experts).permute(2, 1, 0).contiguous()  # (E, r, out)
        h = grouped_mm(x.to(a.dtype), a3, pairs.offsets)
        return grouped_mm(h, b3, pairs.offsets) * self.scaling

    def added_to(self, weight: torch.Tensor) -> torch.Tensor:
        """weight + s·ΔW in one batched GEMM with the add in its epilogue (no separate ΔW tensor of the experts'
        size is made)."""
        a, b = self.lora_A.weight.to(weight.dtype), self.lora_B.weight.to(weight.dtype)
        scaling = float(self.scaling)
        if self.experts == 1:
            return torch.addmm(weight, b, a, alpha=scaling)  # (out, in)
        a3 = a.reshape(self.experts, self.r, a.shape[-1])  # (E, r, in)
        b3 = b.reshape(b.shape[0], self.r, self.experts).permute(2, 0, 1)  # (E, out, r)
        if self.transposed:  # weight is (E, in, out)
            return torch.baddbmm(weight, a3.transpose(1, 2), b3.transpose(1, 2), alpha=scaling)
        return torch.baddbmm(weight, b3, a3, alpha=scaling)  # (E, out, in)


def _param_chain(base: nn.Module) -> tuple[nn.Module, list[AdaptedLayer]]:
    """The module under nested parameter layers, and those layers (outermost first)."""
    layers = []
    while isinstance(base, AdaptedLayer):
        layers.append(base)
        base = base._modules["base_layer"]
    return base, layers


class LoraParameters(nn.Module):
    """LoRA on one parameter of a module that uses it directly (``target_parameters``): a fused expert weight, a
    router's weight. Several parameters of one module get one adapted layer each, nested in the module's registration
    order (the first innermost), the ecosystem's layout in memory and on disk::

        experts.lora_A.<name>.weight               (down_proj, the last)
        experts.base_layer.lora_A.<name>.weight    (gate_up_proj)
        experts.base_layer.base_layer.gate_up_proj (the module's own parameters)

    Fused expert blocks run once, on the routed tokens, with every nested layer's update added on its pairs
    (:meth:`routed_forward`, ``experts.py``); other modules run with W + s·ΔW substituted (``AdaptedLayer`` uses
    ``torch.func.functional_call``). Merging writes the update into the parameter."""

    def __init__(self, base_layer: nn.Module, parameter_name: str, r: int, scaling: float, init: bool | str) -> None:
        super().__init__()
        real, _ = _param_chain(base_layer)
        self.parameter_name = parameter_name
        update = _ParameterUpdate(getattr(real, parameter_name), bool(getattr(real, "is_transposed", False)), r,
                                  scaling, init)
        self.lora_A, self.lora_B = update.lora_A, update.lora_B
        self.__dict__["update"] = update  # the same two modules with the expert layout; not registered twice
        self.adapter_name: str | None = None

    @property
    def updates(self) -> dict[str, _ParameterUpdate]:
        return {self.parameter_name: self.__dict__["update"]}

    def attached(self, layer: AdaptedLayer, name: str) -> None:
        self.adapter_name = name  # to find the same adapter's updates in the nested layers

    def substitute(self, base_layer: nn.Module, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        real, layers = _param_chain(base_layer)
        key = "base_layer." * len(layers) + self.parameter_name  # the path functional_call resolves from base_layer
        out = dict(params)
        out[key] = self.__dict__["update"].added_to(out.get(key, getattr(real, self.parameter_name)))
        return out

    @staticmethod
    def _groups(adapters: list[LoraParameters | None], index: torch.Tensor | None,
                layers: list[AdaptedLayer]) -> list[list[LoraParameters]] | None:
        """Per entry of ``adapters``: it and what the same rows get from the nested parameter layers (every live
        adapter there; in a mixed batch, the row's adapter). ``None`` when a nested layer is not a parameter layer."""
        if any(not all(isinstance(a, LoraParameters) for a in layer._adapters.values()) for layer in layers):
            return None
        if index is None:
            inner = [layer._adapters[n] for layer in layers if not layer.disabled for n in layer.active
                     if n in layer._adapters and n not in layer.merged_adapters]
            return [[a, *inner] for a in adapters if a is not None]
        names = layers[0].routing.unique if layers and layers[0].routing is not None else \
            [None if a is None else a.adapter_name for a in adapters]
        return [[*([] if a is None else [a]), *(layer._adapters[n] for layer in layers if n in layer._adapters)]
                for a, n in zip(adapters, names)]

    @staticmethod
    def routed_forward(adapters: list[LoraParameters | None], index: torch.Tensor | None, x: torch.Tensor,
                       args: tuple, kwargs: dict, base_layer: nn.Module) -> torch.Tensor | None:
        """A fused experts block (see ``experts.py``) run with each token's adapter applied to the pairs routed to
        each expert: the cost follows the tokens, not the experts' size. ``index`` (tokens,) picks each token's entry
        of ``adapters`` (a mixed batch; ``None``: ``adapters[0]`` for all). The nested layers' updates (the block's
        other adapted parameters) join in the same pass. ``None`` when the block or the adapted parameters are not
        the fused expert weights (the caller substitutes W + s·ΔW instead)."""
        real, layers = _param_chain(base_layer)
        groups = LoraParameters._groups(adapters, index, layers)
        if groups is None:
            return None
        names = fused_experts(real)
        present = [(i, g) for i, g in enumerate(groups) if g]
        if names is None and index is not None:
            return LoraParameters._per_row_groups(present, index, x, args, kwargs, real)
        if names is None or not present or any(a.parameter_name not in names for _, g in present for a in g):
            return None

        def delta(group: list[LoraParameters], name: str, xs: torch.Tensor, pairs: Pairs) -> torch.Tensor | None:
            out = None
            for adapter in group:
                if adapter.parameter_name == name:
                    part = adapter.__dict__["update"].routed_delta(xs, pairs)
                    out = part if out is None else out + part
            return out

        def extra(name: str, xs: torch.Tensor, pairs: Pairs) -> torch.Tensor | None:
            if index is None:
                return delta(present[0][1], name, xs, pairs)
            out = None
            owner = index.index_select(0, pairs.token)
            for i, group in present:
                rows = (owner == i).nonzero().flatten()
                if rows.numel():
                    part = delta(group, name, xs.index_select(0, rows), pairs.subset(rows))
                    if part is None:
                        continue
                    base = xs.new_zeros(xs.shape[0], part.shape[-1], dtype=part.dtype) if out is None else out
                    out = base.index_add(0, rows, part)
            return out

        return run_experts(real, x, args, kwargs, extra)

    @staticmethod
    def _per_row_groups(present: list[tuple[int, list[LoraParameters]]], index: torch.Tensor, x: torch.Tensor,
                        args: tuple, kwargs: dict, base_layer: nn.Module) -> Any:
        """A mixed batch through a module that treats its input rows independently (a router: (tokens, d) in,
        per-token logits and choices out): each adapter's rows run with its substituted weights. ``None`` (refused
        by the caller) when the input or an output is not row-aligned."""
        if x.dim() != 2 or args or kwargs:
            return None
        out = base_layer(x)
        outputs = out if isinstance(out, tuple) else (out,)
        if not all(isinstance(o, torch.Tensor) and o.dim() >= 1 and o.shape[0] == x.shape[0] for o in outputs):
            return None
        outputs = list(outputs)
        for i, group in present:
            rows = (index == i).nonzero().flatten()
            if not rows.numel():
                continue
            params: dict[str, torch.Tensor] = {}
            for adapter in group:
                params = adapter.substitute(base_layer, params)
            part = torch.func.functional_call(base_layer, params, (x.index_select(0, rows),))
            part = part if isinstance(part, tuple) else (part,)
            outputs = [o.index_copy(0, rows, p.to(o.dtype)) for o, p in zip(outputs, part, strict=True)]
        return tuple(outputs) if isinstance(out, tuple) else outputs[0]

    def merge_params(self, base_layer: nn.Module, sign: float) -> None:
        real, _ = _param_chain(base_layer)
        with torch.no_grad():
            weight = getattr(real, self.parameter_name)
            weight.add_(self.__dict__["update"].delta().to(weight.dtype), alpha=sign)

    def forward(self, x: Any, y: Any, base_layer: nn.Module) -> Any:
        return y  # the substituted parameters did the work


# Mixture-of-experts models whose experts transformers 5 fuses into 3-D parameters: what "all-linear" also adapts
# there (the ecosystem's choice: the router's weight and both expert parameters). The fused gate/up parameter holds
# what were two linear layers of rank r each, so it gets rank 2r and alpha 2·alpha (the same scale), as HF peft does.
_MOE_ALL_LINEAR = {model_type: ["gate_up_proj", "down_proj", "gate.weight"] for model_type in (
    "mixtral", "minimax", "minimax_m2", "qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "flex_olmo", "deepseek_v2",
    "deepseek_v3", "glm4_moe", "ernie4_5_moe", "hunyuan_v1_moe", "dots1")}
_FUSED_PATTERN = r".*\.gate_up_proj"


def add_parameter_adapters(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    """Attach :class:`LoraParameters` to every module owning a parameter ``config.target_parameters`` names.

    Raises:
        TargetError: no parameter matches.
    """
    from ..inject import iter_modules, set_submodule

    wanted = config.target_parameters or []
    if not wanted:
        return
    found: list[tuple[str, nn.Module, list[str]]] = []
    for path, module in iter_modules(model):
        base, _ = _param_chain(module)
        names = [n for n, p in base._parameters.items() if p is not None and any(
            f"{path}.{n}" == t or f"{path}.{n}".endswith("." + t) for t in wanted)]
        if names and path:
            found.append((path, base, names))
    if not found:
        params = sorted({n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.dim() >= 2})
        raise TargetError(f"target_parameters={wanted} matched no parameter of {type(model).__name__}; parameter names "
                          f"there: {params[:20]}")
    for path, _, names in found:
        for name in names:  # registration order: the first parameter's layer innermost
            r, alpha = config.rank_and_alpha(f"{path}.{name}")  # rank_pattern / alpha_pattern: "<module>.<param>"
            module = model.get_submodule(path)
            _, layers = _param_chain(module)
            if any(not hasattr(a, "parameter_name") for lay in layers for n, a in lay.adapters.items()
                   if n == adapter_name):
                raise UnsupportedError(f"'{path}' is both a target module and owns target_parameters {names} of "
                                       f"adapter '{adapter_name}'; pick one")
            layer = next((lay for lay in layers if any(getattr(a, "parameter_name", None) == name
                                                       for a in lay.adapters.values())), None)
            if layer is None:  # a new layer around whatever wraps the module so far
                layer = AdaptedLayer(module)
                layer.train(module.training)
                set_submodule(model, path, layer)
            elif adapter_name in layer.adapters:
                raise UnsupportedError(f"adapter '{adapter_name}' already adapts parameter '{path}.{name}'")
            layer.add(adapter_name, LoraParameters(module, name, r, _scaling(r, alpha, config.use_rslora),
                                                   config.init_lora_weights))


_CONV = {1: (nn.Conv1d, F.conv1d), 2: (nn.Conv2d, F.conv2d), 3: (nn.Conv3d, F.conv3d)}


class LoraConv(_BiasMerge, nn.Module):
    """LoRA (optionally DoRA) on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``: A is a conv with the base's kernel,
    stride, padding and dilation (in → r), B a 1×1 conv (r → out) with the base's groups.

    With DoRA the magnitude is one value per output channel, stored (1, out, 1, ...) as the ecosystem does."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, use_rslora: bool,
                 init: bool | str, use_dora: bool, lora_bias: bool) -> None:
        super().__init__()
        weight = base_layer.weight
        kw = {"device": weight.device, "dtype": _adapter_dtype(weight)}
        self.dims = weight.dim() - 2
        conv, self._conv_fn = _CONV[self.dims]
        ones = (1,) * self.dims
        self.lora_A = conv(base_layer.in_channels, r, base_layer.kernel_size, base_layer.stride, base_layer.padding,
                           base_layer.dilation, bias=False, **kw)
        self.lora_B = conv(r, base_layer.out_channels, ones, ones, groups=base_layer.groups, bias=lora_bias, **kw)
        self.groups = base_layer.groups
        self.scaling = _scaling(r, alpha, use_rslora)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        _init_pair(self.lora_A.weight, self.lora_B.weight, init, r)
        if lora_bias:
            nn.init.zeros_(self.lora_B.bias)
        self.use_dora = use_dora
        self._dora_merge_scale: torch.Tensor | None = None
        if use_dora:
            with torch.no_grad():
                w = weight.to(kw["dtype"])
                norm = self._channel_norm(w + self.scaling * self._norm_delta(w.shape))
            self.lora_magnitude_vector = _Magnitude(self, norm)  # (1, out, 1, ...)

    @staticmethod
    def _channel_norm(weight: torch.Tensor) -> torch.Tensor:
        """‖W‖ per output channel as (1, out, 1, ...)."""
        return torch.linalg.vector_norm(weight, dim=tuple(range(1, weight.dim())), keepdim=True).transpose(0, 1)

    def _norm_delta(self, shape: torch.Size) -> torch.Tensor:
        """B A (unscaled) laid out in the base kernel's ``shape``: the update DoRA's weight norm is taken over. With
        groups = 1 it is the dense update; on a grouped convolution, which has no dense update, it is the
        (out/groups, in·kernel) product read in the kernel's shape, the ecosystem's definition there."""
        r = self.lora_A.weight.shape[0]
        return (self.lora_B.weight.reshape(-1, r) @ self.lora_A.weight.reshape(r, -1)).reshape(shape)

    def delta_weight(self) -> torch.Tensor:
        """s · B∘A as a conv weight (out, in, *kernel); grouped convolutions have none (see ``merge``)."""
        a, b = self.lora_A.weight, self.lora_B.weight
        r = a.shape[0]
        return (b.reshape(-1, r) @ a.reshape(r, -1)).reshape(b.shape[0], *a.shape[1:]) * self.scaling

    def _lora(self, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_A.weight.to(x.dtype)
        b = self.lora_B.weight.to(x.dtype)
        bias = None if self.lora_B.bias is None else self.lora_B.bias.to(x.dtype)
        la = self.lora_A
        h = self._conv_fn(self.lora_dropout(x), a, None, la.stride, la.padding, la.dilation)
        return self._conv_fn(h, b, bias, groups=self.groups) * self.scaling

    def forward(self, x: torch.Tensor, y: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        if not self.use_dora:
            return y + self._lora(x)
        w = base_layer.weight.to(x.dtype)
        with torch.no_grad():  # DoRA §4.3: the norm is a constant in backward
            norm = self._channel_norm(w + self.scaling * self._norm_delta(w.shape).to(x.dtype))
        scale = (self.lora_magnitude_vector.weight.to(x.dtype) / norm).view(1, -1, *([1] * self.dims))
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = base_layer.bias
            base_out = y if bias is None else y - bias.view(1, -1, *([1] * self.dims))
        else:
            base_out = self._conv_fn(self.lora_dropout(x), w, None, base_layer.stride, base_layer.padding,
                                     base_layer.dilation, base_layer.groups)
        return y + (scale - 1) * base_out + scale * self._lora(x)

    def _check_mergeable(self, base_layer: nn.Module) -> None:
        if self.groups != 1:
            raise UnsupportedError(f"merging LoRA into a grouped {type(base_layer).__name__} (groups={self.groups}) "
                                   "is not supported (nor in HF peft); use the adapter unmerged")
        if self.lora_B.bias is not None and base_layer.bias is None:
            raise UnsupportedError(f"lora_bias cannot be merged into a {type(base_layer).__name__} without a bias; "
                                   "use the adapter unmerged")

    def merge(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        self._check_mergeable(base_layer)
        delta = self.delta_weight().detach().to(weight.dtype)
        if not self.use_dora:
            return weight.add_(delta)
        scale = (self.lora_magnitude_vector.weight.detach().to(weight.dtype) / self._channel_norm(weight + delta))
        scale = scale.reshape(-1, *([1] * (weight.dim() - 1)))  # (out, 1, ...)
        self._dora_merge_scale = scale
        return weight.add_(delta).mul_(scale)

    def unmerge(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        delta = self.delta_weight().detach().to(weight.dtype)
        if not self.use_dora:
            return weight.sub_(delta)
        weight.div_(self._dora_merge_scale).sub_(delta)
        self._dora_merge_scale = None
        return weight



def _loftq(weight: torch.Tensor, r: int, scaling: float, bits: int, iters: int,
           quantized: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ (Li et al. 2023): Q, the values W takes in the quantized format, and A, B with s·B A the rank-r part of
    W - Q, alternating ``iters`` times (Q = quant(W - s·B A), then s·B A = SVD_r(W - Q)). ``quantized``: Q is given
    (a base already quantized), one fit. The factors are split so that s·B A (not B A) is the fitted update: the
    adapted layer starts at Q + SVD_r(W - Q) whatever ``lora_alpha`` is."""
    from ..weights import quantized_values

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


def _ab(adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of any LoRA adapter: A is (r, in, ...), B is (out, r, ...)."""
    if isinstance(adapter, LoraEmbedding):
        return adapter.lora_embedding_A, adapter.lora_embedding_B
    return adapter.lora_A.weight, adapter.lora_B.weight


def _delta_native(adapter: nn.Module) -> torch.Tensor:
    """s·B A in the base layer's own weight layout (Conv1D: (in, out); embeddings: (num, dim); convs: 4-D).

    Random pruning (DARE) draws its mask in this layout, as the ecosystem does, so seeded results agree.
    """
    delta = adapter.delta_weight()
    return delta.T if getattr(adapter, "fan_in_fan_out", False) else delta


def _as_matrix(adapter: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """A native-layout delta as the (out, in) matrix that B A factors (embeddings: (dim, num))."""
    if isinstance(adapter, LoraEmbedding) or getattr(adapter, "fan_in_fan_out", False):
        return delta.T
    return delta.flatten(1)


_QKV = ["q_proj", "v_proj"]


def _tied_heads(model: nn.Module) -> tuple[str | None, list[str]]:
    """The input embedding's path and the paths of the other layers whose weight is that embedding's weight (a tied
    output layer), wrapped or not."""
    from ..inject import iter_modules

    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    embedding = _base_of(embedding) if isinstance(embedding, nn.Module) else None
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None, []
    embed_path, heads = None, []
    for path, module in iter_modules(model):
        base = _base_of(module.original_module) if isinstance(module, ModulesToSave) else _base_of(module)
        if not path or getattr(base, "weight", None) is not weight:
            continue
        if base is embedding:
            embed_path = embed_path or path
        elif path not in heads:
            heads.append(path)
    return embed_path, heads


def _names_any(patterns: Any, paths: list[str]) -> bool:
    from ..inject import _name_matches

    if not patterns:
        return False
    patterns = patterns if isinstance(patterns, str) else list(patterns)
    return any(_name_matches(p, patterns) for p in paths)


def _plan_weight_tying(model: nn.Module, config: LoraConfig) -> tuple[str, str, list[str]] | None:
    """``ensure_weight_tying``, before anything is built: with the tied layers in ``modules_to_save`` or
    ``target_modules``, the config is rewritten as the ecosystem does (the input embedding named, the tied heads
    left out) and ``("modules_to_save" | "target_modules", embedding path, heads)`` says which heads
    :func:`_tie_heads` ties after.
    Without tied layers, or with none of them named, it warns and changes nothing.

    Raises:
        UnsupportedError: DoRA on tied embeddings (the magnitude has no tied form).
    """
    embed_path, heads = _tied_heads(model)
    tied = [embed_path, *heads] if embed_path is not None else []
    in_saved = bool(heads) and _names_any(config.modules_to_save, tied)
    in_targets = bool(heads) and not in_saved and _names_any(config.target_modules, tied)
    if not config.ensure_weight_tying:
        if in_saved or in_targets:
            warnings.warn(f"the output layer {heads} is tied to the input embedding '{embed_path}' and the adapter "
                          "adapts one of them, which then trains untied (merging or converting the model breaks the "
                          "tie); pass ensure_weight_tying=True to keep them tied", PeftWarning, stacklevel=5)
        return None
    if not heads:
        warnings.warn("ensure_weight_tying=True, but the model's output layer is not tied to its input embedding: "
                      "there is nothing to tie", PeftWarning, stacklevel=5)
        return None
    if not (in_saved or in_targets):
        warnings.warn("ensure_weight_tying=True, but no tied layer is in modules_to_save or target_modules: there is "
                      "nothing to tie", PeftWarning, stacklevel=5)
        return None
    if in_saved:
        kept = [m for m in config.modules_to_save if not _names_any([m], heads) or _names_any([m], [embed_path])]
        config.modules_to_save = kept if _names_any(kept, [embed_path]) else [*kept, embed_path]
        return "modules_to_save", embed_path, heads
    if config.use_dora:
        raise UnsupportedError("ensure_weight_tying=True with use_dora=True on tied embeddings: DoRA's magnitude has "
                               "no tied form; leave the embeddings out of target_modules or pass use_dora=False")
    if isinstance(config.target_modules, str):
        config.target_modules = rf"(?:{config.target_modules}|^{re.escape(embed_path)}$)"
    else:
        kept = [m for m in config.target_modules if not _names_any([m], heads) or _names_any([m], [embed_path])]
        config.target_modules = kept if _names_any(kept, [embed_path]) else [*kept, embed_path]
    return "target_modules", embed_path, heads


def _tie_heads(model: nn.Module, config: LoraConfig, adapter_name: str, plan: tuple[str, str, list[str]]) -> None:
    """The tied heads follow the input embedding's adapter: its ``modules_to_save`` copy's weight (one tensor), or
    its LoRA update, transposed (:class:`TiedLoraHead`)."""
    from ..inject import set_submodule

    how, embed_path, heads = plan
    source = model.get_submodule(embed_path)
    for path in heads:
        module = model.get_submodule(path)
        if how == "modules_to_save":
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module)
                set_submodule(model, path, module)
            module.add(adapter_name)
            module.modules_to_save[adapter_name].weight = source.modules_to_save[adapter_name].weight
            continue
        head = TiedLoraHead(source.adapters[adapter_name], source.base_layer, config.lora_dropout)
        if isinstance(module, AdaptedLayer) and adapter_name in module.adapters:  # a pattern matched it too
            module.replace(adapter_name, head)
            continue
        if not isinstance(module, AdaptedLayer):
            module = AdaptedLayer(module)
            set_submodule(model, path, module)
        module.add(adapter_name, head)


class _Transposed(nn.Module):
    """One factor of a tied head: the embedding adapter's parameter ``attr``, transposed, read as ``.weight``. Its
    state-dict entry is that view (the ecosystem's key ``<head>.lora_A.<name>.weight``); loading one changes nothing,
    since the embedding's own entry carries the values."""

    def __init__(self, source: nn.Module, attr: str) -> None:
        super().__init__()
        self.__dict__["_source"] = source  # not a submodule: the embedding's layer holds it
        self.attr = attr

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.__dict__["_source"], self.attr).t()

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        weight = self.weight
        destination[prefix + "weight"] = weight if keep_vars else weight.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        if prefix + "weight" not in state_dict and strict:
            missing_keys.append(prefix + "weight")


class TiedLoraHead(nn.Module):
    """LoRA on an output layer tied to the input embedding (``ensure_weight_tying``): the embedding's update,
    transposed, so the two stay one matrix. With the embedding's E + s·(B A)ᵀ the head computes
    x Eᵀ + s·(x B) A: in the ecosystem's terms ``lora_A = Bᵀ`` (r, dim) and ``lora_B = Aᵀ`` (vocab, r), which it
    shows (and saves) as views; its only parameters are the embedding adapter's. Merging writes nothing when the
    head's weight is the embedding's (the embedding's merge already changed it)."""

    def __init__(self, source: LoraEmbedding, embedding: nn.Module, dropout: float) -> None:
        super().__init__()
        self.__dict__["source"] = source  # neither is a submodule: the embedding's layer holds them
        self.__dict__["embedding"] = embedding
        self.lora_A = _Transposed(source, "lora_embedding_B")
        self.lora_B = _Transposed(source, "lora_embedding_A")
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def scaling(self) -> float:
        return self.__dict__["source"].scaling

    def delta_weight(self) -> torch.Tensor:
        """The head's (vocab, dim) update: the embedding's s·(B A)ᵀ itself."""
        return self.__dict__["source"].delta_weight()

    def forward(self, x: torch.Tensor, y: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        source = self.__dict__["source"]
        b, a = source.lora_embedding_B.to(y.dtype), source.lora_embedding_A.to(y.dtype)
        return y + ((self.lora_dropout(x).to(y.dtype) @ b) * self.scaling) @ a  # (..., vocab)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        pass  # the embedding's tensors carry the values (these are their transposes)

    def merge(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        if base_layer.weight is self.__dict__["embedding"].weight:
            return weight  # one tensor: the embedding's merge writes the update
        return weight.add_(self.delta_weight().to(weight.dtype))

    def unmerge(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        if base_layer.weight is self.__dict__["embedding"].weight:
            return weight
        return weight.sub_(self.delta_weight().to(weight.dtype))


def check_one_bias(config: Any, others: list[Any]) -> None:
    """``bias`` other than ``"none"`` trains the base layers' own bias tensors, which every adapter shares: two
    adapters doing so would train one tensor for both (HF peft allows one such adapter too).

    Raises:
        ConfigError: ``config`` and another adapter both train biases.
    """
    if getattr(config, "bias", "none") == "none":
        return
    if any(getattr(other, "bias", "none") != "none" for other in others):
        raise ConfigError(f"{type(config).__name__}.bias={config.bias!r}: another adapter of this model trains the "
                          "base layers' biases already, and they are one tensor each for all adapters; only one "
                          "adapter may set bias (use bias='none' here)")


@register
class Lora(Method):
    peft_type = PeftType.LORA.value
    config_class = LoraConfig
    default_targets: ClassVar[dict[str, list[str]]] = {
        **{t: _QKV for t in (
            "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
            "gemma3_text", "opt", "gptj", "bart", "mbart", "phi", "stablelm", "olmo", "olmo2", "granite",
            "starcoder2", "cohere", "smollm3", "gpt_oss", "m2m_100", "blenderbot", "whisper",
        )},
        "gpt2": ["c_attn"],
        "gpt_bigcode": ["c_attn"],
        "gpt_neox": ["query_key_value"],
        "bloom": ["query_key_value"],
        "falcon": ["query_key_value"],
        "phi3": ["qkv_proj"],
        "codegen": ["qkv_proj"],
        "mpt": ["Wqkv"],
        "bert": ["query", "value"],
        "roberta": ["query", "value"],
        "xlm-roberta": ["query", "value"],
        "electra": ["query", "value"],
        "camembert": ["query", "value"],
        "distilbert": ["q_lin", "v_lin"],
        "deberta": ["in_proj"],
        "deberta-v2": ["query_proj", "value_proj"],
        "t5": ["q", "v"],
        "mt5": ["q", "v"],
        "umt5": ["q", "v"],
        "vit": ["query", "value"],
    }

    @classmethod
    def saves_embedding_layers(cls, config: LoraConfig) -> bool:
        # With trainable tokens the point is to save a few rows, not the matrices (the ecosystem's rule).
        return config.trainable_token_indices is None and super().saves_embedding_layers(config)

    @classmethod
    def check_new_adapter(cls, config: LoraConfig, others: list[PeftConfig]) -> None:
        check_one_bias(config, others)

    @classmethod
    def attach(cls, model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
        """Wrap the targets; then (PiSSA, OLoRA) take each new adapter's s·B₀A₀ out of its base weight, so the model
        starts from the same function. Only after every adapter was built: a failed attach leaves the base as it was
        (and removing the adapter gives the offset back, see ``LoraLinear.restore_base``)."""
        if is_loading() and isinstance(config.init_lora_weights, str) and "_niter_" in config.init_lora_weights:
            warnings.warn(
                f"loading a '{config.init_lora_weights}' adapter recomputes the base's residual with a new randomized "
                "SVD, which differs from the one it was trained against; save it with "
                "path_initial_model_for_weight_conversion=... to get a plain LoRA adapter for the original base",
                stacklevel=4,
            )
        tying = _plan_weight_tying(model, config)
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if config.target_modules == ALL_LINEAR and config.target_parameters is None and model_type in _MOE_ALL_LINEAR:
            config.target_parameters = list(_MOE_ALL_LINEAR[model_type])  # saved: readers see what was adapted
            config.rank_pattern.setdefault(_FUSED_PATTERN, 2 * config.r)
            config.alpha_pattern.setdefault(_FUSED_PATTERN, 2 * config.lora_alpha)
        only_parameters = config.target_parameters and config.target_modules in (None, [])
        targets = [] if only_parameters else inject(model, config, adapter_name)
        add_parameter_adapters(model, config, adapter_name)
        add_trainable_tokens(model, config, adapter_name)
        if tying is not None:
            _tie_heads(model, config, adapter_name, tying)
        for name in targets:
            layer = model.get_submodule(name)
            adapter = layer.adapters[adapter_name]
            if getattr(adapter, "base_offset", None) is not None and not adapter.offset_applied:
                set_weight(layer.base_layer, adapter.shift_base(get_weight(layer.base_layer), -1.0))
                adapter.offset_applied = True
            if getattr(adapter, "pending_base", None) is not None:
                set_weight(layer.base_layer, adapter.pending_base)
                adapter.pending_base = None
            for prepared in _PREPARED.values():  # what preprocess_loraga / preprocess_corda left there, used
                layer.base_layer.__dict__.pop(prepared, None)

    @classmethod
    def module_targets(cls, model: nn.Module, config: LoraConfig) -> list[str]:
        if config.target_parameters and config.target_modules in (None, []):  # parameters only: no module wrapped
            return []
        return super().module_targets(model, config)

    @classmethod
    def supported_layers(cls) -> str:
        return ("nn.Linear, transformers Conv1D, bitsandbytes 4/8-bit linears, nn.Embedding, nn.Conv1d/2d/3d, "
                "nn.MultiheadAttention")

    @classmethod
    def adapter_shapes(cls, base_layer: nn.Module, config: LoraConfig, module_name: str) -> dict[str, tuple] | None:
        r = config.rank_and_alpha(module_name)[0]
        if isinstance(base_layer, nn.MultiheadAttention):
            embed = base_layer.embed_dim
            return {"lora_A.weight": (r, embed), "lora_B.weight": (3 * embed, r),
                    "base_layer.out_proj.lora_A.weight": (r, embed), "base_layer.out_proj.lora_B.weight": (embed, r)}
        if isinstance(base_layer, nn.Embedding):
            shapes = {"lora_embedding_A": (r, base_layer.num_embeddings),
                      "lora_embedding_B": (base_layer.embedding_dim, r)}
            if config.use_dora:
                shapes["lora_magnitude_vector"] = (base_layer.embedding_dim,)
            return shapes
        if isinstance(base_layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            ones = (1,) * (base_layer.weight.dim() - 2)
            out = base_layer.out_channels
            shapes = {"lora_A.weight": (r, base_layer.in_channels, *base_layer.kernel_size),
                      "lora_B.weight": (out, r // base_layer.groups, *ones)}
            if config.lora_bias:
                shapes["lora_B.bias"] = (out,)
            if config.use_dora:
                shapes["lora_magnitude_vector"] = (1, out, *ones)
            return shapes
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
    def create_adapter(cls, base_layer: nn.Module, config: LoraConfig, module_name: str) -> nn.Module | None:
        r, alpha = config.rank_and_alpha(module_name)
        init = config.init_lora_weights
        kind = type(base_layer).__name__
        if isinstance(base_layer, nn.MultiheadAttention):
            return cls._multihead(base_layer, config, module_name, r, alpha)
        if isinstance(base_layer, nn.Embedding):
            if config.lora_bias:
                raise UnsupportedError(f"lora_bias on nn.Embedding ('{module_name}') is not supported (nor in HF "
                                       "peft); exclude the embedding or set lora_bias=False")
            if init == "loftq":
                raise UnsupportedError(f"init_lora_weights='loftq' on nn.Embedding ('{module_name}') is not "
                                       "implemented in graftkit (a 4-bit base keeps its embeddings in float); exclude "
                                       "the embedding from target_modules")
            return LoraEmbedding(base_layer, r, alpha, config.use_rslora, init, config.use_dora)
        if isinstance(base_layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if r % base_layer.groups:
                raise UnsupportedError(
                    f"LoRA on '{module_name}' ({kind}, groups={base_layer.groups}) needs a rank divisible by the "
                    f"groups, got r={r}; pick r as a multiple of {base_layer.groups} (rank_pattern can set it)"
                )
            if isinstance(init, str) and init not in ("gaussian", "eva"):
                raise UnsupportedError(f"init_lora_weights={init!r} on {kind} ('{module_name}') is not defined (HF "
                                       "peft refuses it too); use True or 'gaussian' for convolutions")
            return LoraConv(base_layer, r, alpha, config.lora_dropout, config.use_rslora, init, config.use_dora,
                            config.lora_bias)
        if isinstance(base_layer, nn.Linear) or kind == "Conv1D" or hasattr(base_layer, "in_features"):
            fan_in_fan_out = kind == "Conv1D"
            return LoraLinear(base_layer, r, alpha, config.lora_dropout, config.use_rslora, config.use_dora, init,
                              fan_in_fan_out, config.lora_bias, config)
        return None

    @classmethod
    def _multihead(cls, base_layer: nn.MultiheadAttention, config: LoraConfig, module_name: str, r: int,
                   alpha: float) -> LoraMultiheadAttention:
        refused = {"key/value dimensions other than the embedding's": not base_layer._qkv_same_embed_dim,
                   "use_dora": config.use_dora, "lora_bias": config.lora_bias,
                   f"init_lora_weights={config.init_lora_weights!r}": isinstance(config.init_lora_weights, str)
                   and config.init_lora_weights not in ("gaussian", "eva")}
        for what, present in refused.items():
            if present:
                raise UnsupportedError(f"LoRA on nn.MultiheadAttention ('{module_name}') with {what} is not supported "
                                       "(nor in HF peft); exclude the module or change that setting")
        if config.lora_dropout:
            warnings.warn(f"lora_dropout={config.lora_dropout} has no effect on nn.MultiheadAttention "
                          f"('{module_name}'): its update is applied to the weights, as in HF peft", stacklevel=5)
        return LoraMultiheadAttention(base_layer, r, alpha, config.use_rslora, config.init_lora_weights)

    @classmethod
    def weighted_config(
        cls, configs: list[LoraConfig], combination_type: str | None, svd_rank: int | None, target_paths: list[str]
    ) -> tuple[str, LoraConfig]:
        """Rank rules: ``cat`` adds the ranks, ``*svd`` (``svd`` is the default) takes ``svd_rank`` or the largest,
        the others need equal ranks. The combined adapter has ``lora_alpha = r`` and targets every module any
        source adapts."""
        combination_type = "svd" if combination_type is None else combination_type
        if any(c.lora_bias for c in configs):
            raise UnsupportedError("add_weighted_adapter does not combine adapters with lora_bias (their B biases "
                                   "have no weighted combination defined); combine adapters without it")
        if len(configs) == 1:
            combination_type = "linear"
        ranks = [c.r if not c.rank_pattern else max(c.r, *c.rank_pattern.values()) for c in configs]
        if combination_type == "cat":
            new_rank = sum(ranks)
        elif combination_type == "svd" or (combination_type.endswith("_svd") and combination_type[:-4] in COMBINATIONS):
            new_rank = svd_rank or max(ranks)
        elif combination_type in COMBINATIONS:
            if len(set(ranks)) != 1:
                raise ConfigError(
                    f"combination_type={combination_type!r} needs adapters of one rank, got ranks {ranks}; "
                    "use 'cat' or 'svd' to combine different ranks"
                )
            new_rank = ranks[0]
        else:
            choices = ["svd", "cat", *COMBINATIONS, *(f"{c}_svd" for c in COMBINATIONS if c != "linear")]
            raise ConfigError(f"unknown combination_type {combination_type!r}; expected one of {choices}")
        config = dataclasses.replace(
            configs[0].copy(), r=new_rank, lora_alpha=new_rank, target_modules=list(target_paths),
            exclude_modules=None, layers_to_transform=None, layers_pattern=None, rank_pattern={}, alpha_pattern={},
        )
        return combination_type, config

    @classmethod
    def combine_into(
        cls,
        target: nn.Module,
        sources: list[tuple[nn.Module | None, float]],
        combination_type: str,
        density: float | None = None,
        majority_sign_method: str = "total",
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
    ) -> None:
        """One layer of ``add_weighted_adapter``.

        ``cat`` stacks the ranks (A rows scaled by wᵢ·sᵢ); ``linear``/``ties``/``dare_*``/``magnitude_prune``
        combine A and B separately with weights ±√|wᵢ·sᵢ| and √|wᵢ·sᵢ|; the ``*svd`` types combine the full
        updates sᵢ·BᵢAᵢ and factor the result with a truncated SVD (optionally clamped at a quantile).
        """
        if getattr(target, "groups", 1) != 1:
            raise UnsupportedError("add_weighted_adapter does not combine LoRA adapters on grouped convolutions")
        t_a, t_b = _ab(target)
        valid = [(a, w) for a, w in sources if a is not None]
        with torch.no_grad():
            t_a.zero_()
            t_b.zero_()
            if not valid:
                return
            if combination_type == "cat":
                a_cat = torch.cat([_ab(a)[0] * (w * a.scaling) for a, w in valid], dim=0)
                b_cat = torch.cat([_ab(a)[1] for a, _ in valid], dim=1)
                t_a[: a_cat.shape[0]] = a_cat
                t_b[:, : b_cat.shape[1]] = b_cat
                return
            weights = [w for _, w in valid]
            if combination_type == "svd" or combination_type.endswith("_svd"):
                kind = "linear" if combination_type == "svd" else combination_type[:-4]
                native = combine([_delta_native(a) for a, _ in valid], weights, kind, density, majority_sign_method)
                delta = _as_matrix(valid[0][0], native)
                u, s, vh = torch.linalg.svd(delta, full_matrices=svd_full_matrices, driver=svd_driver)
                r = t_a.shape[0]
                u, vh = u[:, :r] * s[:r], vh[:r]  # B = U·diag(S), A = Vh, truncated to rank r
                if svd_clamp is not None:
                    high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), svd_clamp)
                    u, vh = u.clamp(-high, high), vh.clamp(-high, high)
                k = u.shape[1]
                t_b.view(t_b.shape[0], -1)[:, :k] = u.to(t_b.dtype)
                t_a.view(r, -1)[:k] = vh.to(t_a.dtype)
                return
            scaled = [w * a.scaling for a, w in valid]
            w_a = [math.copysign(math.sqrt(abs(v)), 1.0 if v >= 0 else -1.0) for v in scaled]
            w_b = [math.sqrt(abs(v)) for v in scaled]
            t_a.copy_(combine([_ab(a)[0] for a, _ in valid], w_a, combination_type, density, majority_sign_method))
            t_b.copy_(combine([_ab(a)[1] for a, _ in valid], w_b, combination_type, density, majority_sign_method))

    @classmethod
    def upgrade_checkpoint(cls, model: nn.Module, config: PeftConfig, tensors: dict[str, torch.Tensor], source: str
                           ) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
        """Adapters saved on transformers 4's per-expert MoE layers load onto transformers 5's fused experts."""
        from .lora_legacy import upgrade_moe_checkpoint

        return upgrade_moe_checkpoint(model, config, tensors, source)

    @classmethod
    def convert_from_initial(cls, config: LoraConfig, tensors: dict[str, torch.Tensor], initial_config: PeftConfig,
                             initial: dict[str, torch.Tensor], source: str) -> tuple[LoraConfig, dict]:
        """A trained PiSSA/OLoRA adapter as a plain LoRA adapter for the original base (``save_pretrained(...,
        path_initial_model_for_weight_conversion=...)``).

        The trained adapter computes W_res + s·B A = W + s·(B A − B₀A₀), which is a LoRA adapter of rank 2r:
        A' = [A; A₀], B' = [B, −B₀], with ``lora_alpha`` doubled (√2 times under rsLoRA) so that s stays the same.
        """
        if not moves_base(config.init_lora_weights):
            raise UsageError(
                f"path_initial_model_for_weight_conversion converts a PiSSA/OLoRA adapter, but this adapter was made "
                f"with init_lora_weights={config.init_lora_weights!r}: it is a plain LoRA adapter already; save it "
                "without that argument"
            )
        if getattr(initial_config, "peft_type", None) != PeftType.LORA:
            raise CheckpointError(f"{source}: the initial adapter is a {initial_config.peft_type} adapter, not LoRA")
        if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
            raise UnsupportedError("converting an rsLoRA adapter with rank_pattern/alpha_pattern is not supported "
                                   "(as in HF peft): the doubled ranks would change its scales")
        out = {}
        for key, value in tensors.items():
            is_a = key.endswith(("lora_A.weight", "lora_embedding_A"))
            is_b = key.endswith(("lora_B.weight", "lora_embedding_B"))
            if key.endswith("lora_B.bias") and key in initial:  # s·(b − b₀)
                out[key] = value - initial[key].to(device=value.device, dtype=value.dtype)
                continue
            if not (is_a or is_b):
                out[key] = value
                continue
            start = initial.get(key)
            if start is None or start.shape != value.shape:
                found = None if start is None else tuple(start.shape)
                raise CheckpointError(
                    f"{source}: the initial adapter has no tensor '{key}' of shape {tuple(value.shape)} (found "
                    f"{found}); pass the folder saved right after get_peft_model, before training"
                )
            start = start.to(device=value.device, dtype=value.dtype)
            out[key] = torch.cat([value, start], dim=0) if is_a else torch.cat([value, -start], dim=1)
        converted = dataclasses.replace(
            config.copy(), init_lora_weights=True, r=2 * config.r,
            lora_alpha=config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2),
            rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
            alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()},
        )
        return converted, out

    @classmethod
    def extra_trainable(cls, model: nn.Module, config: LoraConfig) -> Iterator[tuple[str, nn.Parameter]]:
        if config.bias == "all":
            owned = {id(p) for _, layer in _lora_layers(model) for a in layer.adapters.values() for p in a.parameters()}
            for name, param in model.named_parameters():
                if name.endswith("bias") and id(param) not in owned:
                    yield name, param
        elif config.bias == "lora_only":
            for name, module in model.named_modules():
                if isinstance(module, AdaptedLayer):
                    bias = getattr(module.base_layer, "bias", None)
                    if isinstance(bias, nn.Parameter):
                        yield f"{name}.base_layer.bias", bias


# ---------------------------------------------------------------------------------------------- hot-swapping
def _lora_layers(model: nn.Module) -> list[tuple[str, AdaptedLayer]]:
    from ..model import wrappers

    return [(p, m) for p, m in wrappers(model) if isinstance(m, AdaptedLayer)
            and any(isinstance(a, (LoraLinear, LoraEmbedding, LoraConv)) for a in m.adapters.values())]


def _unwrap_compiled(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's wrapper keeps the model as _orig_mod


def _padded(param: torch.Tensor, dim: int, size: int) -> nn.Parameter:
    shape = list(param.shape)
    shape[dim] = size
    out = param.new_zeros(shape)
    out.narrow(dim, 0, param.shape[dim]).copy_(param.detach())
    return nn.Parameter(out, requires_grad=param.requires_grad)


def prepare_model_for_compiled_hotswap(model: nn.Module, *, target_rank: int | None = None,
                                       config: LoraConfig | dict[str, LoraConfig] | None = None,
                                       check_compiled: str = "error") -> None:
    """Get a model ready to be compiled once and then take other LoRA adapters without recompiling.

    Every LoRA adapter's scale becomes a tensor (a new alpha then changes a value, not the compiled code) and, with
    ``target_rank``, its A and B are zero-padded to that rank (the largest rank that will be swapped in). Call it
    after loading the first adapter and before ``torch.compile``. The padded ranks are zeros, so outputs and saved
    adapters compute the same; ``model.peft_config`` records the padded rank (``lora_alpha`` adjusted to keep the
    scale), and so does ``config`` when given.

    Raises:
        UsageError: the model is compiled already (``check_compiled="error"``), holds no LoRA adapter, or an adapter's
            rank is above ``target_rank``.
    """
    if check_compiled not in ("error", "warn", "ignore"):
        raise UsageError(f"check_compiled must be 'error', 'warn' or 'ignore', got {check_compiled!r}")
    if hasattr(model, "_orig_mod") and check_compiled != "ignore":
        message = "prepare_model_for_compiled_hotswap must run before torch.compile (or the model recompiles anyway)"
        if check_compiled == "error":
            raise UsageError(message)
        warnings.warn(message, stacklevel=2)
    model = _unwrap_compiled(model)
    layers = _lora_layers(model.model if hasattr(model, "peft_config") else model)
    if not layers:
        raise UsageError("prepare_model_for_compiled_hotswap found no LoRA adapter: load the first adapter first")
    lora = [(path, a) for path, layer in layers for a in layer.adapters.values()
            if isinstance(a, (LoraLinear, LoraEmbedding, LoraConv))]
    for path, adapter in lora:  # checked before anything changes
        rank = _ab(adapter)[0].shape[0]
        if target_rank is not None and rank > target_rank:
            raise UsageError(f"'{path}' has an adapter of rank {rank}, above target_rank={target_rank}; pass the "
                             "largest rank of the adapters that will be swapped in")
    for _, adapter in lora:
        a, b = _ab(adapter)
        rank = a.shape[0]
        if target_rank is not None and rank < target_rank and getattr(adapter, "groups", 1) == 1:
            with torch.no_grad():
                if isinstance(adapter, LoraEmbedding):
                    adapter.lora_embedding_A = _padded(a, 0, target_rank)
                    adapter.lora_embedding_B = _padded(b, 1, target_rank)
                else:
                    adapter.lora_A.weight = _padded(a, 0, target_rank)
                    adapter.lora_B.weight = _padded(b, 1, target_rank)
                    adapter.lora_A.out_channels = adapter.lora_A.out_features = target_rank
                    adapter.lora_B.in_channels = adapter.lora_B.in_features = target_rank
        if not isinstance(adapter.scaling, torch.Tensor):  # a buffer: follows .to(), not saved
            scale = float(adapter.scaling)
            del adapter.scaling
            adapter.register_buffer("scaling", torch.tensor(scale, device=a.device), persistent=False)
    if target_rank is None:
        return
    configs = dict(getattr(model, "peft_config", {}))
    if config is not None:
        configs.update(config if isinstance(config, dict) else {"_given": config})
    for lora_config in configs.values():
        if type(lora_config) is LoraConfig:
            _set_rank_keeping_scales(lora_config, target_rank)


def _set_rank_keeping_scales(config: LoraConfig, rank: int) -> None:
    """Set every rank of ``config`` to ``rank`` and each alpha so that every scale stays what it was."""
    def alpha_for(alpha: float, old_rank: int) -> float:
        scale = _scaling(old_rank, alpha, config.use_rslora)
        return scale * (math.sqrt(rank) if config.use_rslora else rank)

    patterns = set(config.rank_pattern) | set(config.alpha_pattern)
    config.alpha_pattern = {k: alpha_for(config.alpha_pattern.get(k, config.lora_alpha), config.rank_pattern.get(k,
                            config.r)) for k in patterns}
    config.lora_alpha = alpha_for(config.lora_alpha, config.r)
    config.rank_pattern = {k: rank for k in config.rank_pattern}
    config.r = rank


def hotswap_adapter(model: nn.Module, model_name_or_path: str | os.PathLike[str], adapter_name: str = "default",
                    torch_device: str | torch.device | None = None, **_: Any) -> None:
    """Replace the weights of the LoRA adapter ``adapter_name`` with a saved adapter's, in place.

    The model's modules, parameters and (after :func:`prepare_model_for_compiled_hotswap`) scales keep their identity
    and shapes, so a compiled model runs the new adapter without recompiling. The saved adapter may have a lower rank
    (zero-padded) and another ``lora_alpha``; it may adapt fewer layers (the others are zeroed), not other ones.
    Everything is checked before anything is written.

    Raises:
        AdapterNameError: no adapter ``adapter_name``.
        ConfigError: the adapters differ in ``use_rslora``, ``lora_dropout``, ``use_dora`` or ``lora_bias``.
        CheckpointError: the saved adapter adapts layers this one does not, or has a larger rank than the live one.
        UsageError: the adapter is merged.
    """
    from ..errors import AdapterNameError
    from ..io import read_checkpoint, resolve_adapter_dir
    from ..model import _with_prefix

    peft_model = _unwrap_compiled(model)
    if adapter_name not in getattr(peft_model, "peft_config", {}):
        raise AdapterNameError(f"no adapter named '{adapter_name}' to hot-swap; adapters: "
                               f"{sorted(getattr(peft_model, 'peft_config', {}))}")
    current = peft_model.peft_config[adapter_name]
    directory = resolve_adapter_dir(os.fspath(model_name_or_path))
    config, tensors = read_checkpoint(directory, False)
    if not isinstance(config, LoraConfig) or type(config) is not type(current):
        raise ConfigError(f"{directory}: hot-swapping replaces a LoRA adapter with a LoRA adapter, got "
                          f"{config.peft_type} for the {current.peft_type} adapter '{adapter_name}'")
    differ = [k for k in ("use_rslora", "lora_dropout", "use_dora", "lora_bias")
              if getattr(config, k) != getattr(current, k)]
    if differ:
        raise ConfigError(f"{directory}: cannot hot-swap into '{adapter_name}': {differ} differ "
                          f"({[(getattr(current, k), getattr(config, k)) for k in differ]}); load it as a new adapter")
    tensors = _with_prefix(tensors)
    live = peft_model.get_adapter_state_dict(adapter_name)
    unexpected = sorted(set(tensors) - set(live))
    if unexpected:
        raise CheckpointError(f"{directory}: the adapter adapts layers that '{adapter_name}' does not "
                              f"({unexpected[:3]}); hot-swapping cannot add layers to a (compiled) model")
    lacking = sorted(k for k in set(live) - set(tensors) if ".lora_" not in k)
    if lacking:
        raise CheckpointError(f"{directory}: the adapter lacks {lacking[:3]}, which '{adapter_name}' trains in full "
                              "(modules_to_save, trainable tokens); only LoRA layers may be left out")
    layers = [(p, m) for p, m in _lora_layers(peft_model.model) if adapter_name in m.adapters]
    if any(adapter_name in m.merged_adapters for _, m in layers):
        raise UsageError(f"adapter '{adapter_name}' is merged; unmerge_adapter() before hot-swapping")
    for key, new in tensors.items():
        old = live[key]
        if new.dim() != old.dim() or any(n > o for n, o in zip(new.shape, old.shape)):
            raise CheckpointError(
                f"{directory}: tensor '{key}' has shape {tuple(new.shape)}, larger than the live {tuple(old.shape)}; "
                "call prepare_model_for_compiled_hotswap(model, target_rank=<largest rank>) before compiling"
            )
    with torch.no_grad():
        for key, old in live.items():
            new = tensors.get(key)
            if new is None:
                old.zero_()  # a LoRA layer the new adapter leaves alone
                continue
            new = new.to(device=torch_device or old.device, dtype=old.dtype)
            if new.shape == old.shape:
                old.copy_(new)
            else:
                old.zero_()
                old[tuple(slice(0, n) for n in new.shape)].copy_(new)
        for path, layer in layers:
            adapter = layer.adapters[adapter_name]
            if not isinstance(adapter, (LoraLinear, LoraEmbedding, LoraConv)):
                continue
            r, alpha = config.rank_and_alpha(path)
            scale = _scaling(r, alpha, config.use_rslora)
            if isinstance(adapter.scaling, torch.Tensor):
                adapter.scaling.fill_(scale)
            else:
                adapter.scaling = scale  # a compiled model recompiles for a new float; prepare it to avoid that
    swapped = config.copy()
    swapped.inference_mode = current.inference_mode
    for field in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"):  # the live layers
        setattr(swapped, field, copy.deepcopy(getattr(current, field)))
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern"):
        setattr(swapped, field, copy.deepcopy(getattr(config, field)))
    live_ranks = {_ab(m.adapters[adapter_name])[0].shape[0] for _, m in layers
                  if isinstance(m.adapters[adapter_name], (LoraLinear, LoraEmbedding, LoraConv))}
    if len(live_ranks) == 1:  # the config of what the model now holds (padded ranks, the same scales)
        _set_rank_keeping_scales(swapped, live_ranks.pop())
    else:
        warnings.warn(f"after hot-swapping, '{adapter_name}' holds ranks {sorted(live_ranks)} that its new config "
                      "cannot describe; save the swapped-in adapter from its own files, not from this model",
                      stacklevel=2)
    peft_model.peft_config[adapter_name] = swapped


def replace_lora_weights_loftq(peft_model: nn.Module, model_path: str | os.PathLike[str] | None = None,
                               adapter_name: str = "default", callback: Any = None) -> None:
    """LoftQ for a model already loaded in 4-bit: set each LoRA layer's A, B so that s·B A is the rank-r part of
    W - Q, W read from the original safetensors (``model_path``: a folder or file; default: the folder the base
    model was loaded from), Q the layer's 4-bit values.

    ``callback(model, module_name) -> bool`` runs after each layer; ``False`` puts that layer's A, B back (keep a
    replacement only when, say, the logits got closer to the full-precision model's).

    Raises:
        AdapterNameError: no LoRA adapter ``adapter_name``.
        CheckpointError: the safetensors are missing or lack a layer's weight, or its shape differs.
        TargetError: no 4-bit layer carries the adapter.
    """
    from ..errors import AdapterNameError
    from ..model import wrappers

    configs = getattr(peft_model, "peft_config", {})
    if not isinstance(configs.get(adapter_name), LoraConfig):
        raise AdapterNameError(f"replace_lora_weights_loftq needs a LoRA adapter named '{adapter_name}'; adapters: "
                               f"{sorted(configs)}")
    inner = peft_model.get_base_model()
    files = _safetensors_files(model_path if model_path is not None else
                               getattr(getattr(inner, "config", None), "_name_or_path", "") or "")
    done = 0
    for name, layer in wrappers(inner):
        adapter = layer.adapters[adapter_name] if isinstance(layer, AdaptedLayer) and \
            adapter_name in layer.adapters else None
        if not isinstance(adapter, LoraLinear) or not is_quantized(layer.base_layer) or \
                "4bit" not in type(layer.base_layer).__name__:
            continue
        key = f"{name}.weight"
        if key not in files:
            raise CheckpointError(f"replace_lora_weights_loftq: no tensor '{key}' in {sorted(set(files.values()))}; "
                                  "pass model_path= the folder of the original (unquantized) model")
        from safetensors import safe_open
        with safe_open(files[key], framework="pt", device="cpu") as handle:
            original = handle.get_tensor(key)
        quantized = get_weight(layer.base_layer)
        if tuple(original.shape) != tuple(quantized.shape):
            raise CheckpointError(f"{files[key]}: '{key}' has shape {tuple(original.shape)}, the 4-bit layer "
                                  f"{tuple(quantized.shape)}; pass the model this one was quantized from")
        r = adapter.lora_A.weight.shape[0]
        _, a, b = _loftq(adapter._oi(original.to(quantized.device)), r, adapter.scaling, 4, 1,
                         quantized=adapter._oi(quantized))
        before = (adapter.lora_A.weight.detach().clone(), adapter.lora_B.weight.detach().clone())
        with torch.no_grad():
            adapter.lora_A.weight.copy_(a)
            adapter.lora_B.weight.copy_(b)
        adapter._cast = None
        if callback is not None and not callback(peft_model, name):
            with torch.no_grad():
                adapter.lora_A.weight.copy_(before[0])
                adapter.lora_B.weight.copy_(before[1])
        done += 1
    if not done:
        raise TargetError(f"replace_lora_weights_loftq: no 4-bit layer carries LoRA adapter '{adapter_name}'; "
                          "load the base with BitsAndBytesConfig(load_in_4bit=True) first")


def _safetensors_files(path: str | os.PathLike[str]) -> dict[str, str]:
    """Tensor name -> file, for a safetensors file, or a folder with ``model.safetensors`` or a sharded index."""
    import json

    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".safetensors"):
        candidates = [path]
    else:
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as handle:
                weight_map = json.load(handle).get("weight_map", {})
            return {k: os.path.join(path, v) for k, v in weight_map.items()}
        if not os.path.isfile(single):
            raise CheckpointError(f"replace_lora_weights_loftq: no model.safetensors (or its index) in '{path}'; pass "
                                  "model_path= the folder or file of the original model (pickled checkpoints cannot be "
                                  "read lazily)")
        candidates = [single]
    from safetensors import safe_open
    out = {}
    for file in candidates:
        with safe_open(file, framework="pt", device="cpu") as handle:
            out.update({k: file for k in handle.keys()})  # noqa: SIM118 (safe_open has no __iter__)
    return out
