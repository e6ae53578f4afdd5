"""LoRA on parameters a module uses directly (``target_parameters``): the fused 3-D expert weights of
mixture-of-experts models (one update per expert) and routers' weights, one nested layer per parameter."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import TargetError, UnsupportedError
from ...experts import Pairs, fused_experts, grouped_mm, run_experts
from ...layer import AdaptedLayer, LayerAdapter
from .config import LoraConfig
from .inits import PARAMETER, init_for_kind
from .linear import _adapter_dtype, _init_pair, _scaling


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


class LoraParameters(LayerAdapter):
    """LoRA on one parameter of a module that uses it directly (``target_parameters``): a fused expert weight, a
    router's weight. Several parameters of one module get one adapted layer each, nested in the module's registration
    order (the first innermost), the ecosystem's layout in memory and on disk::

        experts.lora_A.<name>.weight               (down_proj, the last)
        experts.base_layer.lora_A.<name>.weight    (gate_up_proj)
        experts.base_layer.base_layer.gate_up_proj (the module's own parameters)

    Fused expert blocks run once, on the routed tokens, with every nested layer's update added on its pairs
    (:meth:`routed_forward`, ``experts.py``); other modules run with W + s·ΔW substituted (``AdaptedLayer`` uses
    ``torch.func.functional_call``). Merging writes the update into the parameter."""

    substitutes_weights = True

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
    from ...inject import iter_modules, set_submodule

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
            init = init_for_kind(config.init_lora_weights, PARAMETER, f"parameter '{path}.{name}'")
            layer.add(adapter_name, LoraParameters(module, name, r, _scaling(r, alpha, config.use_rslora), init))
