"""One file per method; importing this package registers them all."""

from .adalora import AdaLora, AdaLoraConfig
from .adaption_prompt import AdaptionPrompt, AdaptionPromptConfig
from .ia3 import IA3, IA3Config
from .lora import Lora, LoraConfig
from .p_tuning import PromptEncoderConfig, PromptEncoderReparameterizationType, PTuning
from .prefix_tuning import PrefixTuning, PrefixTuningConfig
from .prompt_tuning import PromptTuning, PromptTuningConfig, PromptTuningInit
from .trainable_tokens import TrainableTokensConfig, TrainableTokensMethod

__all__ = [
    "IA3", "AdaLora", "AdaLoraConfig", "AdaptionPrompt", "AdaptionPromptConfig", "IA3Config", "Lora", "LoraConfig",
    "PTuning", "PrefixTuning", "PrefixTuningConfig", "PromptEncoderConfig", "PromptEncoderReparameterizationType",
    "PromptTuning", "PromptTuningConfig", "PromptTuningInit", "TrainableTokensConfig", "TrainableTokensMethod",
]
