"""LoRA's initialisations as one table: what each value of ``init_lora_weights`` builds and what it needs.

An entry says how A (r, in) and B (out, r) start, where the adapter sees its base weight as the (out, in) matrix
it updates (an embedding's is (dim, num), the projection its lookup computes)::

    init      builds from          base afterwards               needs
    True      noise (the kind's)   unchanged                     -
    pissa     top-r SVD of W       W - s·B₀A₀ (given back later)  a float base
    loftq     SVD of W - Q         Q, its 4/8-bit values           a float base
    lora_ga   the gradient's SVD   W - s·B₀A₀                     preprocess_loraga, a float base
    ...

and on which layer kinds it is defined: where ``build`` applies, where the ecosystem starts it as plain LoRA
(``init_lora_weights=True``) instead, and (every other kind) refused. ``LoraConfig`` validation and the layer
adapters ask this table, so a new init is one entry here.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import torch

from ...errors import ConfigError, UsageError

# Layer kinds (see method.py's table): where an init can apply.
LINEAR, EMBEDDING, CONV, MULTIHEAD, PARAMETER = "linear", "embedding", "conv", "multihead", "parameter"
ALL_KINDS = frozenset({LINEAR, EMBEDDING, CONV, MULTIHEAD, PARAMETER})


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


@dataclasses.dataclass
class InitInput:
    """What a building init gets from the layer adapter.

    Attributes:
        name: the config value (``"pissa_niter_4"`` for the randomized PiSSA).
        weight: the base weight in its own layout and dtype; ``as_matrix(weight)`` is the (out, in) matrix.
        as_matrix: maps a tensor in the base weight's layout to (out, in).
        out_features / in_features: the adapted matrix's sizes (a ZeRO-3 partition's weight may be empty).
        r, scaling: the adapter's rank and scale s.
        settings: the init's sub-config (``loftq_config`` ...), defaults filled in.
        prepared: what the init's preprocessing call left on the layer, or ``None``.
        sizes: the words for the size limit in errors: (``"min(out, in)"``, ``"a layer of shape (o, i)"``).
    """

    name: str
    weight: torch.Tensor
    as_matrix: Callable[[torch.Tensor], torch.Tensor]
    out_features: int
    in_features: int
    r: int
    scaling: float
    settings: dict[str, Any]
    prepared: Any
    sizes: tuple[str, str]


@dataclasses.dataclass
class Start:
    """A built start: A (r, in), B (out, r) and, for LoftQ, the base's new (out, in) weight."""

    a: torch.Tensor
    b: torch.Tensor
    base: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class LoraInit:
    """One value of ``init_lora_weights``.

    Attributes:
        build: makes A and B (and a new base) from the base weight; ``None``: the layer kind draws noise itself.
        kinds: the layer kinds it is defined on (``build`` or the kind's draw applies).
        plain_on: kinds where the ecosystem starts it as ``init_lora_weights=True``; other kinds refuse it.
        float_base: why a quantized base is refused (what to do instead); ``None``: quantized bases work.
        moves_base: s·B₀A₀ leaves the base when the adapter is attached and comes back when it leaves (the
            adapter's ``base_offset``); a trained adapter converts to plain LoRA of rank 2r.
        from_file: loading takes A and B from the file, fitted to the base the user saved: nothing is computed.
        prepared: the attribute its preprocessing call leaves on each target layer (dropped after the build).
        frozen: names (per layer kind) of factors that keep their start and never train (MiCA's B).
        settings: the dataclass of its sub-config, field ``<name>_config``; ``settings_need_init``: that field set
            with another init is an error.
        check: an extra check of (config, settings) that returns an error message, or ``None``.
    """

    build: Callable[[InitInput], Start] | None = None
    kinds: frozenset[str] = frozenset({LINEAR})
    plain_on: frozenset[str] = frozenset({EMBEDDING, PARAMETER})
    float_base: str | None = None
    moves_base: bool = False
    from_file: bool = False
    prepared: str | None = None
    frozen: dict[str, str] = dataclasses.field(default_factory=dict)
    settings: type | None = None
    settings_need_init: bool = False
    check: Callable[[Any, dict | None], str | None] | None = None


# ------------------------------------------------------------------ builders (the ecosystem's draws and factorizations,
# so the same seed and weights give the same A and B)
def _svd_root(u: torch.Tensor, sv: torch.Tensor, vh: torch.Tensor, scaling: float) -> Start:
    root = torch.sqrt(sv / scaling)  # s·B A = U_r S_r V_rᵀ
    return Start(root[:, None] * vh, u * root[None, :])


def _pissa(ctx: InitInput) -> Start:
    """PiSSA: B A s = the principal part of W (top-r singular triplets; ``pissa_niter_N``: randomized, N iterations)."""
    w = ctx.as_matrix(ctx.weight).to(torch.float32)
    if ctx.name == "pissa":
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        return _svd_root(u[:, :ctx.r], sv[:ctx.r], vh[:ctx.r], ctx.scaling)
    u, sv, v = torch.svd_lowrank(w, q=ctx.r, niter=int(ctx.name.rsplit("_", 1)[1]))
    return _svd_root(u, sv, v.T, ctx.scaling)


def _olora(ctx: InitInput) -> Start:
    """OLoRA: A, B from W's QR factors."""
    q, rr = torch.linalg.qr(ctx.as_matrix(ctx.weight).to(torch.float32))
    return Start(rr[:ctx.r], q[:, :ctx.r])


def _orthogonal(ctx: InitInput) -> Start:
    """Two halves of a random orthogonal matrix, so that B A = 0 (Kaiming-scaled noise)."""
    r = ctx.r
    q, _ = torch.linalg.qr(torch.randn(r, r))
    a = torch.randn(ctx.in_features, r // 2).mm(q[0::2, :]).T / 10.0  # (r, in)
    b = torch.randn(r // 2, ctx.out_features).T.mm(q[1::2, :]) / 10.0  # (out, r)
    return Start(a, b)


def _mica(ctx: InitInput) -> Start:
    """MiCA: B the r minor left singular vectors of W (frozen), A zero (trained)."""
    w = ctx.as_matrix(ctx.weight).to(torch.float32)
    if ctx.r > min(w.shape):
        raise ConfigError(f"init_lora_weights='mica' needs r <= {ctx.sizes[0]} = {min(w.shape)} for {ctx.sizes[1]}, "
                          f"got r={ctx.r}; lower r (rank_pattern)")
    b = torch.linalg.svd(w, full_matrices=False)[0][:, -ctx.r:]
    return Start(torch.zeros(ctx.r, w.shape[1], dtype=w.dtype, device=w.device), b)


def loftq_fit(weight: torch.Tensor, r: int, scaling: float, bits: int, iters: int,
              quantized: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ (Li et al. 2023): Q, A, B with Q the 4/8-bit values and s·B A the rank-r fit of W - Q, alternated
    ``iters`` times (a given ``quantized``: a base already quantized, one fit). The factors are split so that s·B A
    (not B A) is the fitted update: the adapted layer starts at Q + SVD_r(W - Q) whatever ``lora_alpha`` is."""
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


def _loftq(ctx: InitInput) -> Start:
    q, a, b = loftq_fit(ctx.as_matrix(ctx.weight), ctx.r, ctx.scaling, ctx.settings["loftq_bits"],
                        ctx.settings["loftq_iter"])
    return Start(a, b, q)


def _lora_ga(ctx: InitInput) -> Start:
    """LoRA-GA (Wang et al. 2024): A and B from the top 2r singular directions of the weight's gradient, so the
    first steps follow full fine-tuning's; the base gives up s·B A."""
    if ctx.prepared is None:
        raise UsageError("init_lora_weights='lora_ga' needs the weights' gradients: call "
                         "graftkit.preprocess_loraga(model, config, train_step) before get_peft_model")
    r, settings = ctx.r, ctx.settings
    g = ctx.as_matrix(ctx.prepared.to(torch.float32))
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
        top = torch.svd_lowrank(ctx.as_matrix(ctx.weight).to(torch.float32), q=r, niter=4)[1][0]
        if sv_b[0] > 0:
            b = b * (top / sv_b[0])
    elif scale == "gd_scale":
        a, b = a / ctx.scaling, b / ctx.scaling
    dtype = ctx.weight.dtype if ctx.weight.dtype.is_floating_point else torch.float32
    return Start(a.to(dtype).to(torch.float32), b.to(dtype).to(torch.float32))


def _corda(ctx: InitInput) -> Start:
    """CorDA (Yang et al. 2024): s·B A is the part (S, U, V) of W's context-oriented decomposition that
    :func:`preprocess_corda` kept; the base gives it up."""
    if ctx.prepared is None:
        raise UsageError("init_lora_weights='corda' needs the layers' input statistics: call "
                         "graftkit.preprocess_corda(model, config, run_model) before get_peft_model")
    sv, u, v = (t.to(torch.float32) for t in ctx.prepared)
    r, out_features, in_features = ctx.r, ctx.out_features, ctx.in_features
    if sv.shape != (r,) or u.shape != (out_features, r) or v.shape != (in_features, r):
        raise ConfigError(f"the CorDA decomposition holds rank {sv.shape[0]} for a ({out_features}, {in_features}) "
                          f"layer, the adapter wants rank {r}: run preprocess_corda with the same model and config "
                          "(a cache_file built for another rank must be deleted)")
    root = torch.sqrt(sv / ctx.scaling)
    return Start(v.T * root[:, None], u * root[None, :])


# ------------------------------------------------------------------ checks of the sub-configs
def _check_loftq(config: Any, settings: dict | None) -> str | None:
    if settings["loftq_bits"] not in (4, 8) or not isinstance(settings["loftq_iter"], int) or \
            settings["loftq_iter"] < 1 or set(settings) - {"loftq_bits", "loftq_iter"}:
        return (f"LoraConfig.loftq_config needs loftq_bits 4 or 8 and loftq_iter >= 1 (and no other keys), got "
                f"{config.loftq_config}")
    return None


def _check_lora_ga(config: Any, settings: dict | None) -> str | None:
    if settings["direction"] not in ("ArBr", "A2rBr", "ArB2r", "random") or settings["scale"] not in (
            "stable", "weight_svd", "gd_scale", "unit") or set(settings) - {"direction", "scale", "stable_gamma"}:
        return (f"LoraConfig.lora_ga_config={config.lora_ga_config} is not valid: direction is one of ArBr, A2rBr, "
                "ArB2r, random; scale one of stable, weight_svd, gd_scale, unit")
    return None


def _check_corda(config: Any, settings: dict | None) -> str | None:
    keys = sorted(dataclasses.asdict(CordaConfig()))
    if settings["corda_method"] not in ("ipm", "kpm") or set(settings) - set(keys):
        return f"LoraConfig.corda_config={config.corda_config} is not valid: corda_method is 'ipm' or 'kpm'; keys " \
               f"are {keys}"
    return None


def _check_eva(config: Any, settings: dict | None) -> str | None:
    keys = sorted(dataclasses.asdict(EvaConfig()))
    if set(settings) - set(keys) or not settings["rho"] >= 1.0 or not 0 < settings["tau"] <= 1:
        return f"LoraConfig.eva_config={config.eva_config} is not valid: rho >= 1, 0 < tau <= 1, keys {keys}"
    return None


def _check_orthogonal(config: Any, settings: dict | None) -> str | None:
    odd = sorted({r for r in (config.r, *config.rank_pattern.values()) if r % 2})
    if odd:
        return (f"init_lora_weights='orthogonal' needs even ranks (it splits an orthogonal matrix in two halves), "
                f"got r={odd}")
    return None


_FLOAT_PISSA = ("initialise PiSSA on the full-precision model, then quantize the residual model (as HF peft advises); "
                "OLoRA works on quantized bases")
_NOISE_KINDS = frozenset({LINEAR, CONV, MULTIHEAD, PARAMETER})

# init_lora_weights -> what it is. ``pissa_niter_<n>`` is the "pissa" entry (see :func:`find_init`).
INITS: dict[bool | str, LoraInit] = {
    True: LoraInit(kinds=ALL_KINDS, plain_on=frozenset()),
    False: LoraInit(kinds=ALL_KINDS, plain_on=frozenset()),
    "gaussian": LoraInit(kinds=_NOISE_KINDS, plain_on=frozenset({EMBEDDING})),
    "eva": LoraInit(kinds=_NOISE_KINDS, plain_on=frozenset({EMBEDDING}), settings=EvaConfig, check=_check_eva),
    "pissa": LoraInit(_pissa, float_base=_FLOAT_PISSA, moves_base=True),
    "olora": LoraInit(_olora, moves_base=True),
    "orthogonal": LoraInit(_orthogonal, check=_check_orthogonal),
    "loftq": LoraInit(_loftq, plain_on=frozenset({PARAMETER}), from_file=True, settings=LoftQConfig,
                      settings_need_init=True, check=_check_loftq,
                      float_base="quantize the model after get_peft_model, or call graftkit.replace_lora_weights_loftq "
                                 "on a model already in 4-bit"),
    "mica": LoraInit(_mica, kinds=frozenset({LINEAR, EMBEDDING}), plain_on=frozenset({PARAMETER}), from_file=True,
                     frozen={LINEAR: "lora_B.weight", EMBEDDING: "lora_embedding_B"}),
    "lora_ga": LoraInit(_lora_ga, float_base=_FLOAT_PISSA, moves_base=True, from_file=True,
                        prepared="_graftkit_loraga_grad", settings=LoraGAConfig, check=_check_lora_ga),
    "corda": LoraInit(_corda, float_base=_FLOAT_PISSA, moves_base=True, from_file=True,
                      prepared="_graftkit_corda_eigens", settings=CordaConfig, check=_check_corda),
}

NOT_YET: tuple[str, ...] = ()  # HF peft inits graftkit does not implement yet


def find_init(value: object) -> LoraInit | None:
    """The table's entry for an ``init_lora_weights`` value, or ``None`` when there is none."""
    if isinstance(value, bool):
        return INITS[value]
    if not isinstance(value, str):
        return None
    if re.fullmatch(r"pissa_niter_\d+", value):
        return INITS["pissa"]
    return INITS.get(value)


def init_of(value: object) -> LoraInit:
    """:func:`find_init` for a value a validated config holds."""
    entry = find_init(value)
    assert entry is not None, value  # LoraConfig refused it at construction
    return entry


def choices() -> list[bool | str]:
    """The accepted values, for error messages."""
    return [*INITS, "pissa_niter_<n>"]


def moves_base(value: object) -> bool:
    """Whether the init moves a part of the base weight into the adapter (PiSSA, OLoRA, LoRA-GA, CorDA)."""
    entry = find_init(value)
    return entry is not None and entry.moves_base


def prepared_attributes() -> list[str]:
    """What preprocessing calls may leave on target layers (dropped once the adapters are built)."""
    return [e.prepared for e in INITS.values() if e.prepared]


def init_for_kind(value: bool | str, kind: str, where: str) -> bool | str:
    """The init a layer of ``kind`` starts with for ``value``: the value itself where it is defined, ``True`` where
    the ecosystem starts it as plain LoRA.

    Raises:
        UnsupportedError: the init is not defined on this kind of layer.
    """
    from ...errors import UnsupportedError

    entry = init_of(value)
    if kind in entry.kinds:
        return value
    if kind in entry.plain_on:
        return True
    accepted = [k for k, e in INITS.items() if kind in e.kinds or kind in e.plain_on]
    raise UnsupportedError(f"init_lora_weights={value!r} on {where} is not implemented in graftkit for this kind of "
                           f"layer; use one of {accepted}, or exclude the layer from target_modules")
