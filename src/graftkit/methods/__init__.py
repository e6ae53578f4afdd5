"""One file per method; importing this package registers them all."""

from .lora import Lora, LoraConfig
from .prompt_tuning import PromptTuning, PromptTuningConfig, PromptTuningInit

__all__ = ["Lora", "LoraConfig", "PromptTuning", "PromptTuningConfig", "PromptTuningInit"]
