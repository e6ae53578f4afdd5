"""Trainable tokens: train the embedding rows of a few token ids in full, and nothing else.

::

    ids ──► embedding ──► rows ──► (rows of the chosen ids replaced by the trained ones) ──► out

Useful for new special tokens (a chat template's markers) without training the whole embedding matrix: only
``len(token_indices) × dim`` values train. An output layer tied to the embedding (one weight tensor) uses the same
trained rows for those ids' logits. In memory the rows are ``<embedding>.trainable_tokens_delta.<adapter>``; on disk
``<embedding>.trainable_tokens_delta`` (and the tied head's, the same values), as the ecosystem writes them. The
layer kind itself (``TrainableTokens``) is shared with LoRA's ``trainable_token_indices``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn

from ..config import PeftType, TunerConfig
from ..errors import ConfigError, TargetError
from ..inject import find_targets, iter_modules
from ..registry import Method, register
from .lora.tokens import _base_of, input_embedding_path, wrap_token_rows


@dataclasses.dataclass
class TrainableTokensConfig(TunerConfig):
    """Config of a trainable-tokens adapter (field names and meanings as in the HF ecosystem).

    Args:
        token_indices: the token ids whose embedding rows train.
        target_modules: the embedding layer(s) to adapt; ``None`` takes the model's input embedding (its path is
            written into the saved config).
        init_weights: start the rows at the embedding's own (the base model); ``False`` draws them from N(0, 1)
            (for tests).
    """

    peft_type: str | PeftType | None = PeftType.TRAINABLE_TOKENS
    token_indices: list[int] = dataclasses.field(default_factory=list)
    init_weights: bool = True

    bookkeeping_fields: ClassVar[frozenset[str]] = TunerConfig.bookkeeping_fields | {"init_weights"}

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.TRAINABLE_TOKENS
        ids = self.token_indices
        if not isinstance(ids, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0
                                                     for i in ids):
            raise ConfigError(f"TrainableTokensConfig.token_indices must be a list of token ids (ints >= 0), got "
                              f"{ids!r:.80}")
        self.token_indices = list(ids)


def _paths(model: nn.Module, config: TrainableTokensConfig) -> list[str]:
    """The embedding layers the config names (its input embedding when ``target_modules`` is ``None``)."""
    if config.target_modules is None:
        return [input_embedding_path(model, "TrainableTokensConfig(target_modules=['embed_tokens'], ...)")]
    return find_targets(model, config)


@register
class TrainableTokensMethod(Method):
    peft_type = PeftType.TRAINABLE_TOKENS.value
    config_class = TrainableTokensConfig

    @classmethod
    def supported_layers(cls) -> str:
        return "nn.Embedding (an output layer tied to it shares the trained rows)"

    @classmethod
    def saves_embedding_layers(cls, config: TrainableTokensConfig) -> bool:
        return False  # the point is to save a few rows, not the matrix (as the ecosystem decides)

    @classmethod
    def module_targets(cls, model: nn.Module, config: TrainableTokensConfig) -> list[str]:
        paths = _paths(model, config)
        weights = {id(_base_of(model.get_submodule(p)).weight) for p in paths}
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        head = _base_of(head) if head is not None else None
        if head is not None and id(getattr(head, "weight", None)) in weights:
            paths += [p for p, m in iter_modules(model) if p and (m is head or _base_of(m) is head) and p not in paths]
        return paths

    @classmethod
    def attach(cls, model: nn.Module, config: TrainableTokensConfig, adapter_name: str) -> None:
        if not config.token_indices:
            raise ConfigError("TrainableTokensConfig.token_indices is empty: name the token ids to train, e.g. "
                              "token_indices=tokenizer.convert_tokens_to_ids(['<|im_start|>', '<|im_end|>'])")
        paths = _paths(model, config)
        for path in paths:
            base = _base_of(model.get_submodule(path))
            if not isinstance(base, nn.Embedding):
                raise TargetError(f"trainable tokens adapt embeddings; '{path}' is a {type(base).__name__}")
        if config.target_modules is None:  # the saved config names the layer, as the ecosystem's files do
            config.target_modules = paths[0] if len(paths) == 1 else paths
        wrap_token_rows(model, [(p, config.token_indices) for p in paths], adapter_name, nested=False,
                        init=config.init_weights)

    @classmethod
    def adapter_shapes(cls, base_layer: nn.Module, config: TrainableTokensConfig, module_name: str
                       ) -> dict[str, tuple] | None:
        weight = getattr(base_layer, "weight", None)
        if not config.token_indices or weight is None or weight.dim() != 2:
            return None
        return {"trainable_tokens_delta": (len(config.token_indices), weight.shape[1])}

    @classmethod
    def create_adapter(cls, base_layer: nn.Module, config: TrainableTokensConfig, module_name: str) -> None:
        return None  # attach wraps the layers itself


__all__ = ["TrainableTokensConfig", "TrainableTokensMethod"]
