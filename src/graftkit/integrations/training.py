"""Preparing a (quantized) base model for adapter training."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UsageError
from ..model import enable_input_grads


def prepare_model_for_kbit_training(
    model: nn.Module, use_gradient_checkpointing: bool = True, gradient_checkpointing_kwargs: dict | None = None
) -> nn.Module:
    """Get a base model (typically loaded in 4-bit or 8-bit) ready for QLoRA; call before ``get_peft_model``.

    * every parameter is frozen;
    * fp16/bf16 parameters that are not quantized (norms, embeddings, the LM head) are cast to fp32, so the
      layers that run outside the quantized matmuls train stably;
    * with ``use_gradient_checkpointing``, checkpointing is enabled and the input embeddings' output requires
      grad, so adapters inside checkpointed blocks still receive gradients.

    Returns:
        The same model, changed in place.

    Raises:
        UsageError: ``model`` is not a torch module.
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"prepare_model_for_kbit_training needs the base model (an nn.Module), "
                         f"got {type(model).__name__}")
    for param in model.parameters():
        param.requires_grad_(False)
    for param in model.parameters():
        quantized = type(param).__name__ in ("Params4bit", "Int8Params") or not param.dtype.is_floating_point
        if param.dtype in (torch.float16, torch.bfloat16) and not quantized:
            param.data = param.data.to(torch.float32)
    if use_gradient_checkpointing:
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if enable is not None:
            enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs or {})
        enable_input_grads(model)
    return model
