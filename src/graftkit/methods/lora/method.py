"""The LoRA method: what it adapts, how it builds each layer kind's adapter, and how adapters combine."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from ...config import ALL_LINEAR, PeftConfig, PeftType
from ...errors import CheckpointError, ConfigError, UnsupportedError, UsageError
from ...inject import inject
from ...layer import AdaptedLayer
from ...merging import COMBINATIONS, combine
from ...registry import Method, is_loading, register
from ...weights import get_weight, set_weight
from .config import LoraConfig
from .inits import init_for_kind, moves_base, prepared_attributes
from .layers import _lora_layers, kind_of
from .parameters import _FUSED_PATTERN, _MOE_ALL_LINEAR, add_parameter_adapters
from .tokens import add_trainable_tokens
from .tying import _plan_weight_tying, _tie_heads

_QKV = ["q_proj", "v_proj"]


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
            for prepared in prepared_attributes():  # what preprocess_loraga / preprocess_corda left there, used
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
        kind = kind_of(base_layer)
        return None if kind is None else kind.adapter.saved_shapes(base_layer, config,
                                                                   config.rank_and_alpha(module_name)[0])

    @classmethod
    def create_adapter(cls, base_layer: nn.Module, config: LoraConfig, module_name: str) -> nn.Module | None:
        kind = kind_of(base_layer)
        if kind is None:
            return None
        r, alpha = config.rank_and_alpha(module_name)
        torch_nn = type(base_layer).__module__.startswith("torch.nn")
        where = f"{'nn.' if torch_nn else ''}{type(base_layer).__name__} ('{module_name}')"
        init = init_for_kind(config.init_lora_weights, kind.name, where)
        return kind.adapter.build(base_layer, config, module_name, r, alpha, init)

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
        t_a, t_b = target.factors()
        valid = [(a, w) for a, w in sources if a is not None]
        with torch.no_grad():
            t_a.zero_()
            t_b.zero_()
            if not valid:
                return
            if combination_type == "cat":
                a_cat = torch.cat([a.factors()[0] * (w * a.scaling) for a, w in valid], dim=0)
                b_cat = torch.cat([a.factors()[1] for a, _ in valid], dim=1)
                t_a[: a_cat.shape[0]] = a_cat
                t_b[:, : b_cat.shape[1]] = b_cat
                return
            weights = [w for _, w in valid]
            if combination_type == "svd" or combination_type.endswith("_svd"):
                kind = "linear" if combination_type == "svd" else combination_type[:-4]
                native = combine([a.native_delta() for a, _ in valid], weights, kind, density, majority_sign_method)
                delta = valid[0][0].as_matrix(native)
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
            t_a.copy_(combine([a.factors()[0] for a, _ in valid], w_a, combination_type, density, majority_sign_method))
            t_b.copy_(combine([a.factors()[1] for a, _ in valid], w_b, combination_type, density, majority_sign_method))

    @classmethod
    def upgrade_checkpoint(cls, model: nn.Module, config: PeftConfig, tensors: dict[str, torch.Tensor], source: str
                           ) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
        """Adapters saved on transformers 4's per-expert MoE layers load onto transformers 5's fused experts."""
        from .legacy import upgrade_moe_checkpoint

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
