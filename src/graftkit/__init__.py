"""graftkit: parameter-efficient fine-tuning for PyTorch and Hugging Face transformers.

Public API (names as in the Hugging Face ecosystem); re-exports only.
"""

from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .config import PeftConfig, PeftType, PromptLearningConfig, TaskType
from .errors import (
    AdapterNameError,
    CheckpointError,
    ConfigError,
    GraftkitError,
    MissingPackageError,
    PeftWarning,
    SaveError,
    TargetError,
    UnsupportedError,
    UsageError,
)
from .helpers import check_if_peft_model, disable_input_dtype_casting, load_peft_weights, rescale_adapter_scale
from .integrations import prepare_model_for_kbit_training
from .methods import (
    AdaLoraConfig,
    AdaptionPromptConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptTuningConfig,
    PromptTuningInit,
    TrainableTokensConfig,
)
from .methods.lora import (
    CordaConfig,
    EvaConfig,
    LoftQConfig,
    LoraGAConfig,
    get_eva_state_dict,
    hotswap_adapter,
    initialize_lora_eva_weights,
    prepare_model_for_compiled_hotswap,
    preprocess_corda,
    preprocess_loraga,
    replace_lora_weights_loftq,
)
from .model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
    inject_adapter_in_model,
)
from .optimizers import LoraFAOptimizer, create_lorafa_optimizer, create_loraplus_optimizer
from .state import (
    StateDictError,
    get_base_model_state_dict,
    get_peft_model_state_dict,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from .status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status

__version__ = "0.1.0"

# The trainers import transformers' Trainer (and TRL): loaded on first use, so `import graftkit` stays light and
# works without TRL. `from graftkit import SFTTrainer` without TRL raises MissingPackageError naming the package
# (so SFTTrainer stays out of __all__: `from graftkit import *` must work without TRL).
_LAZY = {"Trainer": ".integrations.trainer", "AdapterTrainerMixin": ".integrations.trainer",
         "SFTTrainer": ".integrations.trl"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'graftkit' has no attribute '{name}'")

__all__ = [
    "AdaLoraConfig",
    "AdapterNameError",
    "AdapterTrainerMixin",
    "AdaptionPromptConfig",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "CheckpointError",
    "ConfigError",
    "CordaConfig",
    "EvaConfig",
    "GraftkitError",
    "IA3Config",
    "LoftQConfig",
    "LoraConfig",
    "LoraFAOptimizer",
    "LoraGAConfig",
    "MissingPackageError",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PeftWarning",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "SaveError",
    "StateDictError",
    "TargetError",
    "TaskType",
    "TunerLayerStatus",
    "TunerModelStatus",
    "Trainer",
    "TrainableTokensConfig",
    "UnsupportedError",
    "UsageError",
    "check_if_peft_model",
    "create_lorafa_optimizer",
    "create_loraplus_optimizer",
    "disable_input_dtype_casting",
    "get_base_model_state_dict",
    "get_eva_state_dict",
    "get_layer_status",
    "get_model_status",
    "get_peft_model",
    "get_peft_model_state_dict",
    "hotswap_adapter",
    "initialize_lora_eva_weights",
    "inject_adapter_in_model",
    "load_peft_weights",
    "prepare_model_for_compiled_hotswap",
    "prepare_model_for_kbit_training",
    "preprocess_corda",
    "preprocess_loraga",
    "replace_lora_weights_loftq",
    "rescale_adapter_scale",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
    "__version__",
]
