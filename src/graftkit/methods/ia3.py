"""(IA)³: infused adapter by inhibiting and amplifying inner activations (Liu et al. 2022).

::

    attention / other layers:   x ──► W ──► y ──► y ⊙ l            (l: one learned scale per output feature)
    feed-forward layers:        x ──► x ⊙ l ──► W ──► y            (l: one learned scale per input feature)

``l`` starts at ones, so training starts from the base model. Merging folds ``l`` into the weight: output
scaling multiplies the weight's rows (and the bias), input scaling its columns; unmerging divides them out.
A row or column whose scale is exactly 0 cannot be divided back, so merging keeps a copy of those (only those)
and unmerging restores them.

The parameter name ``ia3_l`` and its shapes ((out, 1) for output scaling, (1, in) for input scaling, (1, C, 1, 1)
on ``nn.Conv2d``) are the on-disk format of the ecosystem.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PeftType, TunerConfig, check_regex
from ..errors import ConfigError, TargetError, UnsupportedError
from ..layer import LayerAdapter
from ..registry import Method, register
from ..weights import get_weight, linear_features


@dataclasses.dataclass
class IA3Config(TunerConfig):
    """Config of an (IA)³ adapter (field names and meanings as in the HF ecosystem).

    Args:
        feedforward_modules: the targeted modules whose *input* is scaled (the paper's feed-forward layers);
            the other targets get their output scaled. Names or one regex, matched like ``target_modules``;
            ``None`` takes the architecture's default (as ``target_modules`` does). A list must be a subset of
            a list ``target_modules``.
        fan_in_fan_out: the base weight is stored (in, out) (transformers' ``Conv1D``); detected from the layer
            type, so this only needs setting for custom layers.
        init_ia3_weights: start the scales at ones (the base model); ``False`` draws them from N(0, 1) (for tests).
    """

    peft_type: str | PeftType | None = PeftType.IA3
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    bookkeeping_fields: ClassVar[frozenset[str]] = TunerConfig.bookkeeping_fields | {"init_ia3_weights"}
    graftkit_only_fields: ClassVar[frozenset[str]] = frozenset({"layers_to_transform", "layers_pattern"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.IA3
        if isinstance(self.feedforward_modules, str):
            check_regex(self.feedforward_modules, "IA3Config.feedforward_modules")
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            def targeted(name: str) -> bool:  # a target's name, or a suffix / extension of one
                return any(t == name or t.endswith("." + name) or name.endswith("." + t) for t in self.target_modules)

            extra = sorted(name for name in self.feedforward_modules if not targeted(name))
            if extra:
                raise ConfigError(
                    f"IA3Config.feedforward_modules {extra} are not in target_modules {self.target_modules}; "
                    "feed-forward modules must also be targets (add them to target_modules)"
                )

    def is_feedforward(self, module_name: str) -> bool:
        """Whether the module at ``module_name`` gets its input (not its output) scaled."""
        patterns = self.feedforward_modules
        if patterns is None:
            return False
        if isinstance(patterns, str):
            return re.fullmatch(patterns, module_name) is not None
        return any(module_name.endswith(p) for p in patterns)  # the ecosystem's rule: a plain suffix


_CONVS = (nn.Conv2d, nn.Conv3d)


class IA3Vector(LayerAdapter):
    """(IA)³ output scaling on a linear layer (``nn.Linear``, ``Conv1D``, quantized linears) or ``nn.Conv2d`` /
    ``nn.Conv3d``; :class:`IA3InputVector` scales the input instead.

    Attributes:
        ia3_l: (out, 1) for output scaling, (1, in) for input scaling; (1, C, 1, 1) on a Conv2d, (1, C, 1, 1, 1) on
            a Conv3d.
    """

    def __init__(self, base_layer: nn.Module, feedforward: bool, fan_in_fan_out: bool, init: bool) -> None:
        super().__init__()
        weight = get_weight(base_layer)
        self.conv = isinstance(base_layer, _CONVS)
        self.spatial = weight.dim() - 2 if self.conv else 0  # the convolution's spatial dims (2 or 3)
        self.fan_in_fan_out = fan_in_fan_out
        self.feedforward = feedforward
        if self.conv:
            channels = base_layer.in_channels if feedforward else base_layer.out_channels
            shape: tuple[int, ...] = (1, channels, *([1] * self.spatial))
        else:
            out_features, in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
            shape = (1, in_features) if feedforward else (out_features, 1)
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) or not weight.dtype.is_floating_point \
            else weight.dtype
        self.ia3_l = nn.Parameter(torch.ones(shape, device=weight.device, dtype=dtype))
        if not init:
            with torch.no_grad():
                self.ia3_l.normal_()
        self._kept: dict[str, torch.Tensor] = {}  # weight slices a merge zeroed, for unmerge

    def _vector(self, dtype: torch.dtype) -> torch.Tensor:
        """The scales as a flat vector in ``dtype``: (out,) or (in,)."""
        return self.ia3_l.reshape(-1).to(dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, y: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        scale = self._vector(y.dtype)  # (out,)
        return y * (scale.view(-1, *([1] * self.spatial)) if self.conv else scale)

    @staticmethod
    def mixed_forward(
        adapters: list[IA3Vector | None], index: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
        base_layer: nn.Module, cache: dict,
    ) -> torch.Tensor | None:
        """Each row scaled by its own adapter's vector in one gathered multiply; ``None`` asks for the grouped path."""
        live = [a for a in adapters if a is not None]
        if live[0].conv:
            return None
        out_features = y.shape[-1]
        rows = [a._vector(y.dtype) if a is not None else y.new_ones(out_features) for a in adapters]
        scale = torch.stack(rows)[index]  # (B, out)
        return y * scale.view(y.shape[0], *([1] * (y.dim() - 2)), out_features)

    # ------------------------------------------------------------------ merge
    def _weight_scale(self, dtype: torch.dtype) -> torch.Tensor:
        """The scales shaped to multiply the base weight in its own layout."""
        scale = self.ia3_l.detach().to(dtype)
        if self.conv:
            ones = [1] * self.spatial
            return scale.reshape(1, -1, *ones) if self.feedforward else scale.reshape(-1, 1, *ones)
        return scale.T if self.fan_in_fan_out else scale  # Conv1D stores (in, out)

    def _zero_index(self) -> tuple[int, torch.Tensor]:
        """(weight dim that the scales run along, indices of the scales that are exactly 0)."""
        if self.conv:
            dim = 1 if self.feedforward else 0
        else:
            dim = (1 if self.feedforward else 0) ^ int(self.fan_in_fan_out)
        return dim, (self.ia3_l.detach().reshape(-1) == 0).nonzero().flatten()

    def merge(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        dim, zeros = self._zero_index()
        if zeros.numel():
            self._kept["weight"] = weight.index_select(dim, zeros.to(weight.device)).clone()
        return weight.mul_(self._weight_scale(weight.dtype))

    def unmerge(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        scale = self._weight_scale(weight.dtype)
        weight.div_(torch.where(scale == 0, torch.ones_like(scale), scale))
        dim, zeros = self._zero_index()
        kept = self._kept.pop("weight", None)
        if kept is not None and zeros.numel() == kept.shape[dim]:
            weight.index_copy_(dim, zeros.to(weight.device), kept.to(weight.dtype))
        return weight

    def merge_bias(self, bias: torch.Tensor) -> torch.Tensor:
        """Output scaling scales the bias too: y ⊙ l = (W x + b) ⊙ l."""
        scale = self._vector(bias.dtype)
        zeros = (scale == 0).nonzero().flatten()
        if zeros.numel():
            self._kept["bias"] = bias[zeros].clone()
        return bias * scale

    def unmerge_bias(self, bias: torch.Tensor) -> torch.Tensor:
        scale = self._vector(bias.dtype)
        out = bias / torch.where(scale == 0, torch.ones_like(scale), scale)
        kept = self._kept.pop("bias", None)
        if kept is not None:
            out[(scale == 0).nonzero().flatten()] = kept
        return out


class IA3InputVector(IA3Vector):
    """(IA)³ on a feed-forward layer: the layer's input is scaled (AdaptedLayer calls ``transform_input`` before
    the base layer), so the output passes through and the bias is untouched."""

    changes_input = True

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        scale = self._vector(x.dtype)  # (in,)
        return x * (scale.view(-1, *([1] * self.spatial)) if self.conv else scale)

    def forward(self, x: torch.Tensor, y: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return y

    @staticmethod
    def mixed_forward(adapters: list[IA3Vector | None], index: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                      base_layer: nn.Module, cache: dict) -> torch.Tensor:
        return y  # each row's input was scaled before the base layer

    def merge_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias

    def unmerge_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias


# The ecosystem's defaults: (targets, feed-forward modules) per model type.
_DEFAULTS: dict[str, tuple[list[str], list[str]]] = {
    "t5": (["k", "v", "wo"], ["wo"]),
    "mt5": (["k", "v", "wi_1"], []),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "gpt_neo": (["q_proj", "v_proj", "c_proj"], ["c_proj"]),
    "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gpt_bigcode": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
    "deberta": (["in_proj", "output.dense"], ["output.dense"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma3_text": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
}


def _check_feedforward_targeted(model: nn.Module, config: IA3Config) -> None:
    """With a regex on either side (which the config cannot compare by name), every layer ``feedforward_modules``
    selects must be a target: a feed-forward layer left out of the targets would silently lose its scaling.

    Raises:
        ConfigError: a selected layer is not targeted, or the feed-forward pattern selects no target at all.
    """
    from ..inject import find_targets
    from ..layer import AdaptedLayer

    if not config.feedforward_modules:
        return
    targets = set(find_targets(model, config))
    wrapped = [name for name, m in model.named_modules() if isinstance(m, AdaptedLayer)]
    selected = [name for name, module in model.named_modules()
                if name and config.is_feedforward(name) and not any(name.startswith(w + ".") for w in wrapped)
                and (isinstance(module, (*_CONVS, AdaptedLayer)) or linear_features(module) is not None)]
    left_out = [name for name in selected if name not in targets]
    if left_out:
        raise ConfigError(f"IA3Config.feedforward_modules selects {len(left_out)} layer(s) target_modules does not, "
                          f"e.g. {left_out[:3]}; feed-forward modules must also be targets (add them to "
                          "target_modules, or narrow feedforward_modules)")
    if not selected:
        raise ConfigError(f"IA3Config.feedforward_modules={config.feedforward_modules!r} selects no layer of "
                          f"{type(model).__name__}; check the names (targets: {sorted(targets)[:3]} ...)")


@register
class IA3(Method):
    peft_type = PeftType.IA3.value
    config_class = IA3Config
    default_targets: ClassVar[dict[str, list[str]]] = {k: v[0] for k, v in _DEFAULTS.items()}

    @classmethod
    def supported_layers(cls) -> str:
        return "nn.Linear, transformers Conv1D, bitsandbytes 4/8-bit linears, nn.Conv2d, nn.Conv3d"

    @classmethod
    def attach(cls, model: nn.Module, config: IA3Config, adapter_name: str) -> None:
        regex = isinstance(config.feedforward_modules, str) or isinstance(config.target_modules, str)
        if regex and config.feedforward_modules is not None:  # lists are compared by name in the config itself
            _check_feedforward_targeted(model, config)
        if config.feedforward_modules is None:  # the saved config names them, as the ecosystem's files do
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            if model_type not in _DEFAULTS:
                raise ConfigError(
                    f"IA3Config.feedforward_modules is not set and model_type={model_type!r} has no default; pass "
                    "feedforward_modules (the targets whose input is scaled, e.g. ['down_proj']), or [] for none"
                )
            config.feedforward_modules = list(_DEFAULTS[model_type][1])
        return super().attach(model, config, adapter_name)

    @classmethod
    def adapter_shapes(cls, base_layer: nn.Module, config: IA3Config, module_name: str) -> dict[str, tuple] | None:
        if config.feedforward_modules is None:
            return None
        feedforward = config.is_feedforward(module_name)
        if isinstance(base_layer, _CONVS):
            channels = base_layer.in_channels if feedforward else base_layer.out_channels
            return {"ia3_l": (1, channels, *([1] * (base_layer.weight.dim() - 2)))}
        features = linear_features(base_layer)
        if features is None:
            return None
        fan_in, fan_out = features
        return {"ia3_l": (1, fan_in) if feedforward else (fan_out, 1)}

    @classmethod
    def create_adapter(cls, base_layer: nn.Module, config: IA3Config, module_name: str) -> nn.Module | None:
        feedforward = config.is_feedforward(module_name)
        kind = type(base_layer).__name__
        if isinstance(base_layer, _CONVS):
            if base_layer.groups != 1 and feedforward:
                raise UnsupportedError(
                    f"IA3 input scaling on grouped {kind} ('{module_name}', groups={base_layer.groups}) is not "
                    "implemented in graftkit; leave it out of feedforward_modules or target_modules"
                )
            kind_class = IA3InputVector if feedforward else IA3Vector
            return kind_class(base_layer, feedforward, False, config.init_ia3_weights)
        if isinstance(base_layer, nn.Embedding):
            return None
        if isinstance(base_layer, nn.Linear) or kind == "Conv1D" or hasattr(base_layer, "in_features"):
            return (IA3InputVector if feedforward else IA3Vector)(
                base_layer, feedforward, kind == "Conv1D", config.init_ia3_weights)
        return None

    @classmethod
    def weighted_config(
        cls, configs: list[IA3Config], combination_type: str | None, svd_rank: int | None, target_paths: list[str]
    ) -> tuple[str, IA3Config]:
        """The combined adapter scales by Σ wᵢ lᵢ (``linear``, the only combination of scale vectors) on every
        module a source adapts; its feed-forward modules are the union of the sources'."""
        if combination_type not in (None, "linear"):
            raise ConfigError(
                f"IA3 adapters combine as the weighted sum of their scale vectors (combination_type='linear'); "
                f"got combination_type={combination_type!r}"
            )
        feedforward = [c.feedforward_modules for c in configs]
        if all(isinstance(f, list) or f is None for f in feedforward):
            merged: list[str] | str = sorted({name for f in feedforward for name in (f or [])})
        elif all(isinstance(f, str) for f in feedforward):
            merged = "|".join(f"({f})" for f in feedforward)
        else:
            raise ConfigError("add_weighted_adapter: the IA3 adapters give feedforward_modules as names in some and "
                              f"as a regex in others ({feedforward!r}); give them one way")
        config = dataclasses.replace(
            configs[0].copy(), target_modules=list(target_paths), feedforward_modules=merged, exclude_modules=None,
            layers_to_transform=None, layers_pattern=None,
        )
        return "linear", config

    @classmethod
    def combine_into(cls, target: IA3Vector, sources: list[tuple[nn.Module | None, float]], combination_type: str,
                     **options: Any) -> None:
        with torch.no_grad():
            target.ia3_l.zero_()
            for source, weight in sources:
                if source is None:
                    continue
                if source.ia3_l.shape != target.ia3_l.shape:
                    raise TargetError(
                        "add_weighted_adapter: the IA3 adapters scale a layer on different sides (input in one, output "
                        f"in another: shapes {tuple(source.ia3_l.shape)} and {tuple(target.ia3_l.shape)}); "
                        "combine adapters with the same feedforward_modules"
                    )
                target.ia3_l.add_(source.ia3_l.to(target.ia3_l.dtype), alpha=weight)
