"""LoRA files written for transformers 4's mixture-of-experts layout, read onto transformers 5's fused experts.

transformers 4 built each expert of Mixtral, Qwen-MoE, OLMoE, ... as separate linear layers
(``block_sparse_moe.experts.3.w1``); transformers 5 fuses them into 3-D parameters (``mlp.experts.gate_up_proj`` of
shape (experts, 2·intermediate, hidden) holding w1 and w3, ``mlp.experts.down_proj`` holding w2) and makes the router
a module with a bare ``weight``. Adapters trained on the old layout are common; this module re-expresses them in the
layout HF peft writes for the new one, so they load as if saved there:

* per-expert A/B pairs of the layers fused into one parameter become that parameter's LoRA: per expert
  A = [A_w1; A_w3] (the ranks stacked) and B = blockdiag(B_w1, B_w3) (each branch keeps its own output rows), then
  the experts laid out as HF peft stores them (A's rows expert by expert, B's columns rank by rank);
* the fused parameter's rank is the branches' ranks added up and its alpha gives the branches' scale (with rsLoRA
  too; a branch with another scale has it folded into its B block);
* a router that was a linear layer and is now a module with a ``weight`` moves from ``target_modules`` to
  ``target_parameters`` (same tensors);
* the renames transformers applies to the base checkpoint (``block_sparse_moe`` -> ``mlp``) apply to the adapter.

What to convert comes from transformers' own table of checkpoint conversions for the model type, so every
architecture transformers converts is covered without a list here.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from ...errors import CheckpointError, UnsupportedError
from ...weights import linear_features

PREFIX = "base_model.model."
_LAYERS = (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)
_LORA = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")


def _conversions(model: nn.Module) -> tuple[list[tuple[str, str]], list[tuple[list[str], str]]]:
    """(module renames as (regex, replacement), fusions as (source patterns, target pattern)) that transformers
    applies to this model type's old checkpoints; both empty when it applies none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return [], []
    try:
        mapping = get_checkpoint_conversion_mapping(model_type) or [] if model_type else []
    except Exception:  # noqa: BLE001 - an unknown model type or another transformers: nothing to convert
        return [], []
    renames, fusions = [], []
    for entry in mapping:
        sources, targets = list(getattr(entry, "source_patterns", [])), list(getattr(entry, "target_patterns", []))
        if len(targets) != 1 or not sources:
            continue
        if getattr(entry, "operations", None):  # experts merged (and maybe concatenated) into one parameter
            if all(s.endswith(".weight") and s.count("*") == 1 for s in sources):
                fusions.append((sources, targets[0]))
        elif len(sources) == 1:
            source, target = sources[0], targets[0]
            weight = (source.endswith("weight"), target.endswith("weight"))
            if weight == (False, False):
                renames.append((source, target))
            elif weight == (True, True):  # a parameter renamed with its module: rename the module's LoRA
                cut = lambda p: re.sub(r"(\\?\.)?weight$", "", p)  # noqa: E731
                renames.append((cut(source) + r"(?=\.lora_)", cut(target)))
    return renames, fusions


def _source_regex(pattern: str) -> re.Pattern[str]:
    """``.experts.*.w1.weight`` -> a regex for what the file holds of that layer: (prefix)(expert)(rest)."""
    head, tail = pattern.split("*")
    return re.compile(rf"^(?P<prefix>.*?){re.escape(head)}(?P<expert>\d+){re.escape(tail[: -len('weight')])}"
                      r"(?P<rest>.+)$")


def _base(model: nn.Module, path: str) -> nn.Module | None:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    return getattr(module, "base_layer", module)


def _alpha_for(scaling: float, r: int, use_rslora: bool) -> float:
    alpha = scaling * (math.sqrt(r) if use_rslora else r)
    return float(round(alpha)) if abs(alpha - round(alpha)) < 1e-9 else alpha


def upgrade_moe_checkpoint(model: nn.Module, config: Any, tensors: dict[str, torch.Tensor], source: str
                           ) -> tuple[Any, dict[str, torch.Tensor]]:
    """(config, tensors) of a LoRA adapter saved on transformers 4's per-expert layout, in the layout of ``model``'s
    fused experts; anything else comes back unchanged (``config`` is copied before any change).

    Raises:
        UnsupportedError: DoRA or ``lora_bias`` on experts that are fused now.
        CheckpointError: an expert or a fused branch missing from the file, or experts of unequal rank.
    """
    renames, fusions = _conversions(model)
    if not renames and not fusions:
        return config, tensors
    regexes = [[_source_regex(s) for s in sources] for sources, _ in fusions]
    # (fused module path, parameter) -> [per source: {expert: {part: tensor}}]; the original layer path of each source
    fused: dict[tuple[str, str], list[dict[int, dict[str, torch.Tensor]]]] = {}
    origin: dict[tuple[str, str, int], str] = {}
    legacy_names: set[str] = set()
    kept: dict[str, torch.Tensor] = {}
    for original, value in tensors.items():
        key = original
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        hit = next(((f, i, m) for f, patterns in enumerate(regexes) for i, r in enumerate(patterns)
                    if (m := r.match(key))), None)
        if hit is None:
            kept[key] = value
            continue
        f, i, match = hit
        sources, target = fusions[f]
        if match["rest"] not in ("lora_A.weight", "lora_B.weight"):
            raise UnsupportedError(f"{source}: {original}: DoRA or lora_bias on experts that transformers 5 fuses into "
                                   "one parameter cannot be converted; load this adapter with transformers 4")
        module, parameter = (match["prefix"] + target).rsplit(".", 1)
        branches = fused.setdefault((module, parameter), [{} for _ in sources])
        branches[i].setdefault(int(match["expert"]), {})[match["rest"][:6]] = value
        layer, expert = original.rsplit(".", 2)[0], f".{match['expert']}."
        head, _, tail = layer.rpartition(expert)  # the layer's path with its expert number left open
        origin.setdefault((module, parameter, i), f"{head}.{{}}.{tail}" if head else layer)
        legacy_names.add(sources[i].split("*")[1].strip(".").rsplit(".", 1)[0])
    targeted = config.target_parameters or []
    routers = [p for p in _routers(model, kept)  # those the config targets already were saved on transformers 5
               if not any(f"{p}.weight" == t or f"{p}.weight".endswith("." + t) for t in targeted)]
    if not fused and not routers and kept.keys() == tensors.keys():
        return config, tensors
    config = config.copy()
    out = dict(kept)
    rank_pattern: dict[str, Any] = {}
    alpha_pattern: dict[str, Any] = {}
    settings: dict[str, set[tuple[int, float]]] = {}
    new_parameters: dict[str, list[str]] = {}
    for (module, parameter), branches in sorted(fused.items()):
        path = _path(module)
        a, b, rank, scale = _fuse(model, config, module, parameter, branches,
                                  [origin[(module, parameter, i)] for i in range(len(branches))], source)
        out[f"{module}.{parameter}.lora_A.weight"] = a
        out[f"{module}.{parameter}.lora_B.weight"] = b
        settings.setdefault(parameter, set()).add((rank, scale))
        rank_pattern[rf"{re.escape(path)}\.{re.escape(parameter)}"] = rank
        alpha_pattern[rf"{re.escape(path)}\.{re.escape(parameter)}"] = _alpha_for(scale, rank, config.use_rslora)
        new_parameters.setdefault(module, []).append(parameter)
    for parameter, values in settings.items():  # the same for every layer: one pattern, as HF peft writes it
        if len(values) != 1:
            continue
        for key in [k for k in rank_pattern if k.endswith(rf"\.{re.escape(parameter)}")]:
            del rank_pattern[key], alpha_pattern[key]
        ((rank, scale),) = values
        if (rank, _alpha_for(scale, rank, config.use_rslora)) != (config.r, config.lora_alpha):
            rank_pattern[rf".*\.{re.escape(parameter)}"] = rank
            alpha_pattern[rf".*\.{re.escape(parameter)}"] = _alpha_for(scale, rank, config.use_rslora)
    # HF peft's keys for the i-th of k adapted parameters of one module: "base_layer." (k-1-i) times, then lora_A/B
    for module, parameters in new_parameters.items():
        base = _base(model, _path(module))
        order = [n for n in (base._parameters if base is not None else {}) if n in parameters] or parameters
        for i, parameter in enumerate(order):
            for part in ("lora_A", "lora_B"):
                out[f"{module}.{'base_layer.' * (len(order) - 1 - i)}{part}.weight"] = out.pop(
                    f"{module}.{parameter}.{part}.weight")
    _rewrite_config(model, config, legacy_names, [p for ps in new_parameters.values() for p in ps], routers,
                    rank_pattern, alpha_pattern)
    return config, out


def _path(key_module: str) -> str:
    return key_module[len(PREFIX):] if key_module.startswith(PREFIX) else key_module


def _fuse(model: nn.Module, config: Any, module: str, parameter: str, branches: list[dict[int, dict]],
          origins: list[str], source: str) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(lora_A, lora_B, rank, scale) of one fused parameter from its branches' per-expert pairs."""
    base = _base(model, _path(module))
    weight = getattr(base, parameter, None) if base is not None else None
    experts = weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 3 else \
        1 + max(max(by_expert) for by_expert in branches)
    scales = []
    for i, by_expert in enumerate(branches):
        missing = [e for e in range(experts) if len(by_expert.get(e, {})) != 2]
        if missing:
            raise CheckpointError(f"{source}: no LoRA pair for {origins[i].format(missing[0])}, which transformers "
                                  f"5 fuses with the other experts' into {module}.{parameter}: a file written for "
                                  "transformers 4 must adapt every expert of a layer it adapts")
        ranks = {by_expert[e]["lora_A"].shape[0] for e in range(experts)}
        if len(ranks) != 1:
            raise CheckpointError(f"{source}: the experts of {origins[i].format('*')} have different ranks "
                                  f"{sorted(ranks)}; a fused expert parameter takes one rank for all experts")
        r, alpha = ranks.pop(), config.rank_and_alpha(origins[i].format(0))[1]
        scales.append(alpha / (math.sqrt(r) if config.use_rslora else r))
    scale = scales[0]  # other branches' scales go into their B blocks
    a = torch.stack([torch.cat([by_expert[e]["lora_A"] for by_expert in branches]) for e in range(experts)])
    b = torch.stack([torch.block_diag(*[by_expert[e]["lora_B"] * (s / scale) for by_expert, s in zip(
        branches, scales, strict=True)]) for e in range(experts)])
    rank = a.shape[1]
    # HF peft's layout: A's rows expert by expert (e·R + k), B's columns rank by rank (k·E + e)
    return (a.reshape(experts * rank, a.shape[2]).contiguous(),
            b.permute(1, 2, 0).reshape(b.shape[1], rank * experts).contiguous(), rank, scale)


def _routers(model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Module paths with a LoRA pair in the file that are no longer linear layers but own a 2-D ``weight`` of the
    pair's shape (transformers 5's routers): their LoRA now targets that parameter."""
    moved = []
    for key in tensors:
        match = _LORA.match(key)
        if not match or match["part"] != "lora_A":
            continue
        path = _path(match["module"])
        base = _base(model, path)
        if base is None or linear_features(base) is not None or isinstance(base, _LAYERS):
            continue  # still a layer LoRA wraps
        weight = getattr(base, "weight", None)
        b = tensors.get(f"{match['module']}.lora_B.weight")
        if isinstance(weight, torch.Tensor) and b is not None and (b.shape[0], tensors[key].shape[1]) == tuple(
                weight.shape):
            moved.append(path)
    return moved


def _rewrite_config(model: nn.Module, config: Any, legacy_names: set[str], parameters: list[str], routers: list[str],
                    rank_pattern: dict[str, Any], alpha_pattern: dict[str, Any]) -> None:
    router_names = {p.rsplit(".", 1)[-1] for p in routers}
    wanted = list(dict.fromkeys([*(config.target_parameters or []), *parameters,
                                 *(f"{n}.weight" for n in sorted(router_names))]))
    config.target_parameters = wanted or None
    targets = config.target_modules
    if isinstance(targets, (list, set, tuple)):
        paths = [p for p, _ in model.named_modules() if p]
        still = []
        for name in targets:  # keep a name while some module that is not a converted router still answers to it
            hits = [p for p in paths if (p == name or p.endswith("." + name)) and p not in routers]
            if hits or (name not in legacy_names and name not in router_names):
                still.append(name)
        config.target_modules = sorted(still) if isinstance(targets, set) else still
    config.rank_pattern = {**rank_pattern, **(config.rank_pattern or {})}
    config.alpha_pattern = {**alpha_pattern, **(config.alpha_pattern or {})}
