"""LoRA's config (field names and meanings as in the HF ecosystem); the inits and their sub-configs are in inits.py."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

from ...config import PeftType, TunerConfig, check_regex
from ...errors import ConfigError, UnsupportedError
from .inits import INITS, NOT_YET, CordaConfig, EvaConfig, LoftQConfig, LoraGAConfig, choices, find_init

__all__ = ["CordaConfig", "EvaConfig", "LoftQConfig", "LoraConfig", "LoraGAConfig"]

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
        for name, entry in INITS.items():  # sub-configs given as their dataclasses are stored as dicts
            field = f"{name}_config"
            if entry.settings is not None and isinstance(getattr(self, field), entry.settings):
                setattr(self, field, dataclasses.asdict(getattr(self, field)))
        super().__post_init__()
        self.peft_type = PeftType.LORA
        if self.r <= 0:
            raise ConfigError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"LoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        init = find_init(self.init_lora_weights)
        if init is None:
            later = " (an HF peft initialisation graftkit does not implement yet)" \
                if self.init_lora_weights in NOT_YET else ""
            raise UnsupportedError(
                f"LoraConfig.init_lora_weights={self.init_lora_weights!r} is not implemented in graftkit{later}; "
                f"use one of {choices()}"
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
        settings = None
        if init.settings is not None:  # the init's sub-config, defaults filled in
            field = f"{self.init_lora_weights}_config"
            settings = {**dataclasses.asdict(init.settings()), **(getattr(self, field) or {})}
        problem = None if init.check is None else init.check(self, settings)
        if problem:
            raise ConfigError(problem)
        if settings is not None:
            setattr(self, field, settings)
        for name, entry in INITS.items():
            field = f"{name}_config"
            if entry.settings_need_init and getattr(self, field) and self.init_lora_weights != name:
                raise ConfigError(f"LoraConfig.{field}={getattr(self, field)} is set but init_lora_weights is "
                                  f"{self.init_lora_weights!r}; set init_lora_weights={name!r} or drop {field}")
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
