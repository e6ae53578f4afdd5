"""``replace_lora_weights_loftq``: LoftQ initialisation of an existing LoRA model on a 4-bit base."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ...errors import CheckpointError, TargetError
from ...layer import AdaptedLayer
from ...weights import get_weight, is_quantized
from .config import LoraConfig
from .inits import loftq_fit
from .linear import LoraLinear


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
    from ...errors import AdapterNameError
    from ...model import wrappers

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
        _, a, b = loftq_fit(adapter._oi(original.to(quantized.device)), r, adapter.scaling, 4, 1,
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
