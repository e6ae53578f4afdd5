"""LoRA: low-rank adaptation (Hu et al. 2021), with rsLoRA scaling, DoRA (Liu et al. 2024), its initialisations,
trainable tokens, LoRA on parameters (mixture-of-experts weights), tied embeddings, hot-swapping and the readers of
older files.

The files import downward in this order (each names only core and the files before it)::

    inits       the table of initialisations (init_lora_weights) and their sub-configs
    config      LoraConfig, validated against the inits table
    linear      LoRA/DoRA on linear layers; LoraFactors, what every factored layer kind answers
    layers      embeddings, convolutions, nn.MultiheadAttention; the table of layer kinds
    tokens      trainable tokens
    parameters  LoRA on parameters (fused experts, routers)
    tying       ensure_weight_tying
    legacy      transformers 4's per-expert MoE files
    method      the registered method (Lora)
    hotswap     hot-swapping weights into a compiled model
    loftq       replace_lora_weights_loftq
    data        inits that take data (EVA, CorDA, LoRA-GA)

Parameter names (``lora_A.weight``, ``lora_embedding_A``, ``lora_magnitude_vector`` ...) are the on-disk tensor
names of the ecosystem's format.
"""

from .config import LoraConfig
from .data import get_eva_state_dict, initialize_lora_eva_weights, preprocess_corda, preprocess_loraga
from .hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from .inits import CordaConfig, EvaConfig, LoftQConfig, LoraGAConfig
from .layers import LoraConv, LoraEmbedding, LoraMultiheadAttention
from .linear import LoraLinear
from .loftq import replace_lora_weights_loftq
from .method import Lora, check_one_bias
from .parameters import LoraParameters
from .tokens import TrainableTokens
from .tying import TiedLoraHead

__all__ = [
    "CordaConfig", "EvaConfig", "LoftQConfig", "Lora", "LoraConfig", "LoraConv", "LoraEmbedding", "LoraGAConfig",
    "LoraLinear", "LoraMultiheadAttention", "LoraParameters", "TiedLoraHead", "TrainableTokens", "check_one_bias",
    "get_eva_state_dict", "hotswap_adapter", "initialize_lora_eva_weights", "prepare_model_for_compiled_hotswap",
    "preprocess_corda", "preprocess_loraga", "replace_lora_weights_loftq",
]
