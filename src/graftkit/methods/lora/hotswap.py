"""Hot-swapping LoRA weights into a (compiled) model without recompiling."""

from __future__ import annotations

import copy
import math
import os
import warnings
from typing import Any

import torch
from torch import nn

from ...errors import CheckpointError, ConfigError, UsageError
from .config import LoraConfig
from .layers import _lora_layers
from .linear import LoraFactors, _scaling


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
            if isinstance(a, LoraFactors)]
    for path, adapter in lora:  # checked before anything changes
        rank = adapter.factors()[0].shape[0]
        if target_rank is not None and rank > target_rank:
            raise UsageError(f"'{path}' has an adapter of rank {rank}, above target_rank={target_rank}; pass the "
                             "largest rank of the adapters that will be swapped in")
    for _, adapter in lora:
        a, b = adapter.factors()
        rank = a.shape[0]
        if target_rank is not None and rank < target_rank and getattr(adapter, "groups", 1) == 1:
            with torch.no_grad():
                adapter.set_factors(_padded(a, 0, target_rank), _padded(b, 1, target_rank))
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
    from ...errors import AdapterNameError
    from ...io import read_checkpoint, resolve_adapter_dir
    from ...model import _with_prefix

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
            if not isinstance(adapter, LoraFactors):
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
    live_ranks = {m.adapters[adapter_name].factors()[0].shape[0] for _, m in layers
                  if isinstance(m.adapters[adapter_name], LoraFactors)}
    if len(live_ranks) == 1:  # the config of what the model now holds (padded ranks, the same scales)
        _set_rank_keeping_scales(swapped, live_ranks.pop())
    else:
        warnings.warn(f"after hot-swapping, '{adapter_name}' holds ranks {sorted(live_ranks)} that its new config "
                      "cannot describe; save the swapped-in adapter from its own files, not from this model",
                      stacklevel=2)
    peft_model.peft_config[adapter_name] = swapped
