"""The other LoRA layer kinds: ``nn.Embedding`` (rows of Aᵀ looked up), ``nn.Conv1d/2d/3d`` (A a conv with the
base's kernel, B a 1×1 conv) and ``nn.MultiheadAttention``; and the table of layer kinds (``KINDS``): which base
layers a kind takes, and its adapter class, which answers its saved shapes and builds itself. A new layer kind is
its class plus one row."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UnsupportedError
from ...layer import AdaptedLayer, LayerAdapter
from ...registry import is_loading
from ...weights import linear_features
from .config import LoraConfig
from .inits import CONV, EMBEDDING, LINEAR, MULTIHEAD, InitInput, init_of
from .linear import LoraFactors, LoraLinear, _adapter_dtype, _BiasMerge, _init_pair, _Magnitude, _scaling


class LoraEmbedding(LoraFactors):
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
        start = init_of(init)
        self.frozen_parameters: tuple[str, ...] = tuple(v for k, v in start.frozen.items() if k == EMBEDDING)
        with torch.no_grad():
            if init is False:
                nn.init.normal_(self.lora_embedding_A)
                nn.init.normal_(self.lora_embedding_B)
            elif start.build is not None and not (start.from_file and is_loading()):
                # the matrix the adapter updates is the projection the lookup computes: (dim, num)
                built = start.build(InitInput(init, weight.detach(), lambda t: t.T, dim, num, r, self.scaling, {},
                                              None, ("min(num_embeddings, embedding_dim)",
                                                     f"an embedding of shape {tuple(weight.shape)}")))
                self.lora_embedding_A.copy_(built.a)
                self.lora_embedding_B.copy_(built.b)
            else:  # A is the lookup table here, so it is the zero half
                nn.init.zeros_(self.lora_embedding_A)
                nn.init.normal_(self.lora_embedding_B)
        self.use_dora = use_dora
        self._dora_merge_scale: torch.Tensor | None = None
        if use_dora:
            with torch.no_grad():
                norm = self._column_norm(weight.to(kw["dtype"]), self.delta_weight())
            self.lora_magnitude_vector = _Magnitude(self, norm)  # (dim,)

    @classmethod
    def saved_shapes(cls, base_layer: nn.Module, config: LoraConfig, r: int) -> dict[str, tuple] | None:
        shapes = {"lora_embedding_A": (r, base_layer.num_embeddings), "lora_embedding_B": (base_layer.embedding_dim, r)}
        if config.use_dora:
            shapes["lora_magnitude_vector"] = (base_layer.embedding_dim,)
        return shapes

    @classmethod
    def build(cls, base_layer: nn.Module, config: LoraConfig, module_name: str, r: int, alpha: float,
              init: bool | str) -> LoraEmbedding:
        if config.lora_bias:
            raise UnsupportedError(f"lora_bias on nn.Embedding ('{module_name}') is not supported (nor in HF "
                                   "peft); exclude the embedding or set lora_bias=False")
        return cls(base_layer, r, alpha, config.use_rslora, init, config.use_dora)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A, self.lora_embedding_B

    def set_factors(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.lora_embedding_A, self.lora_embedding_B = a, b

    def native_delta(self) -> torch.Tensor:
        return self.delta_weight()

    def as_matrix(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T  # (num, dim) -> (dim, num)

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


class LoraMultiheadAttention(LayerAdapter):
    """LoRA on ``nn.MultiheadAttention``: one update on the packed q/k/v input projection (B: (3·embed, r)) and one on
    the output projection, laid out as the ecosystem lays them out: this adapter holds the input projection's pair
    (``<path>.lora_A.<name>.weight``), and the output projection is an adapted layer of its own inside the base
    (``<path>.base_layer.out_proj.lora_A.<name>.weight``), put there when this adapter joins its layer.

    The module's forward reads ``in_proj_weight`` and ``out_proj.weight`` directly (neither projection has a forward
    of its own), so the adapter substitutes W + s·B A for both (``AdaptedLayer`` runs the module with
    ``torch.func.functional_call``). Merging writes the input projection's update; the output projection's layer
    merges its own.
    """

    substitutes_weights = True

    @classmethod
    def saved_shapes(cls, base_layer: nn.Module, config: LoraConfig, r: int) -> dict[str, tuple] | None:
        embed = base_layer.embed_dim
        return {"lora_A.weight": (r, embed), "lora_B.weight": (3 * embed, r),
                "base_layer.out_proj.lora_A.weight": (r, embed), "base_layer.out_proj.lora_B.weight": (embed, r)}

    @classmethod
    def build(cls, base_layer: nn.Module, config: LoraConfig, module_name: str, r: int, alpha: float,
              init: bool | str) -> LoraMultiheadAttention:
        refused = {"key/value dimensions other than the embedding's": not base_layer._qkv_same_embed_dim,
                   "use_dora": config.use_dora, "lora_bias": config.lora_bias}
        for what, present in refused.items():
            if present:
                raise UnsupportedError(f"LoRA on nn.MultiheadAttention ('{module_name}') with {what} is not supported "
                                       "(nor in HF peft); exclude the module or change that setting")
        if config.lora_dropout:
            warnings.warn(f"lora_dropout={config.lora_dropout} has no effect on nn.MultiheadAttention "
                          f"('{module_name}'): its update is applied to the weights, as in HF peft", stacklevel=5)
        return cls(base_layer, r, alpha, config.use_rslora, init)

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

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the input projection's update (the output projection's layer holds its own)."""
        return self.lora_A.weight, self.lora_B.weight

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


_CONV = {1: (nn.Conv1d, F.conv1d), 2: (nn.Conv2d, F.conv2d), 3: (nn.Conv3d, F.conv3d)}


class LoraConv(_BiasMerge, LoraFactors):
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

    @classmethod
    def saved_shapes(cls, base_layer: nn.Module, config: LoraConfig, r: int) -> dict[str, tuple] | None:
        ones = (1,) * (base_layer.weight.dim() - 2)
        out = base_layer.out_channels
        shapes = {"lora_A.weight": (r, base_layer.in_channels, *base_layer.kernel_size),
                  "lora_B.weight": (out, r // base_layer.groups, *ones)}
        if config.lora_bias:
            shapes["lora_B.bias"] = (out,)
        if config.use_dora:
            shapes["lora_magnitude_vector"] = (1, out, *ones)
        return shapes

    @classmethod
    def build(cls, base_layer: nn.Module, config: LoraConfig, module_name: str, r: int, alpha: float,
              init: bool | str) -> LoraConv:
        if r % base_layer.groups:
            raise UnsupportedError(
                f"LoRA on '{module_name}' ({type(base_layer).__name__}, groups={base_layer.groups}) needs a rank "
                f"divisible by the groups, got r={r}; pick r as a multiple of {base_layer.groups} (rank_pattern can "
                "set it)"
            )
        return cls(base_layer, r, alpha, config.lora_dropout, config.use_rslora, init, config.use_dora,
                   config.lora_bias)

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


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """A kind of base layer LoRA adapts: its name in the inits table, which modules it takes, its adapter class."""

    name: str
    takes: Callable[[nn.Module], bool]
    adapter: type


# First match wins: the specific kinds before the linear one, which takes any module with linear features.
KINDS = (
    LayerKind(MULTIHEAD, lambda m: isinstance(m, nn.MultiheadAttention), LoraMultiheadAttention),
    LayerKind(EMBEDDING, lambda m: isinstance(m, nn.Embedding), LoraEmbedding),
    LayerKind(CONV, lambda m: isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)), LoraConv),
    LayerKind(LINEAR, lambda m: isinstance(m, nn.Linear) or linear_features(m) is not None or hasattr(m, "in_features"),
              LoraLinear),
)


def kind_of(base_layer: nn.Module) -> LayerKind | None:
    """The row of ``KINDS`` that takes ``base_layer``, or ``None`` (LoRA does not adapt it)."""
    return next((kind for kind in KINDS if kind.takes(base_layer)), None)


def _lora_layers(model: nn.Module) -> list[tuple[str, AdaptedLayer]]:
    from ...model import wrappers

    return [(p, m) for p, m in wrappers(model) if isinstance(m, AdaptedLayer)
            and any(isinstance(a, LoraFactors) for a in m.adapters.values())]
