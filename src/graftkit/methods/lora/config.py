"""LoRA's config and the sub-configs of its data-driven inits (field names and meanings as in the HF ecosystem)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

from ...config import PeftType, TunerConfig, check_regex
from ...errors import ConfigError, UnsupportedError

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
