"""Helpers for training stacks: quantized bases, transformers Trainer, TRL, accelerate / DDP / FSDP."""

from .training import prepare_model_for_kbit_training

__all__ = ["prepare_model_for_kbit_training"]
