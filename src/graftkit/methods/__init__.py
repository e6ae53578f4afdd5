"""One file per method; importing this package registers them all."""

from .lora import Lora, LoraConfig

__all__ = ["Lora", "LoraConfig"]
