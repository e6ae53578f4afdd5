"""P-tuning (Liu et al. 2021): virtual tokens produced by a small trained encoder.

::

    E (n × d, trained) ──► MLP  (d → h → h → d, ReLU)          ──► prompt (n × d) ──► as in prompt tuning
                       └─► LSTM (bidirectional, h) ──► MLP (2h → 2h → d)

The encoder only reparameterizes the prompt while it trains (it smooths the optimisation); what reaches the
model, and what is saved as ``prompt_embeddings``, is its output. A loaded adapter therefore holds the prompt
rows themselves and no encoder, in graftkit as in the ecosystem's format. Everything after the prompt
(inputs, masks, labels, generation) is prompt tuning's (see ``prompt_tuning.py``).
"""

from __future__ import annotations

import dataclasses
import enum

from torch import nn

from ..config import PeftType, PromptLearningConfig
from ..errors import ConfigError
from ..registry import Method, is_loading, register
from .prompt_tuning import PromptEmbedding, prepare_virtual_tokens


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"


@dataclasses.dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """Config of a p-tuning adapter (field names and meanings as in the HF ecosystem).

    Args:
        encoder_reparameterization_type: ``"MLP"`` (two hidden layers) or ``"LSTM"`` (a bidirectional LSTM
            followed by a two-layer MLP).
        encoder_hidden_size: the encoder's hidden size ``h``; the model's hidden size when ``None``.
        encoder_num_layers: LSTM layers (the MLP always has two hidden layers, as in the ecosystem).
        encoder_dropout: dropout between LSTM layers.
    """

    peft_type: str | PeftType | None = PeftType.P_TUNING
    encoder_reparameterization_type: str | PromptEncoderReparameterizationType = (
        PromptEncoderReparameterizationType.MLP)
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.P_TUNING
        kind = str(getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type))
        choices = [c.value for c in PromptEncoderReparameterizationType]
        if kind not in choices:
            raise ConfigError(f"PromptEncoderConfig.encoder_reparameterization_type must be one of {choices}, "
                              f"got {kind!r}")
        self.encoder_reparameterization_type = PromptEncoderReparameterizationType(kind)
        for field in ("encoder_hidden_size", "encoder_num_layers"):
            value = getattr(self, field)
            if value is not None and value <= 0:
                raise ConfigError(f"PromptEncoderConfig.{field} must be a positive integer, got {value}")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ConfigError(f"PromptEncoderConfig.encoder_dropout must be in [0, 1), got {self.encoder_dropout}")


class MlpEncoder(nn.Module):
    """A three-layer MLP over the prompt rows (``mlp_head``, as the ecosystem names it)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                      nn.Linear(hidden, dim))

    def forward(self, rows):  # (1, n, d) -> (1, n, d)
        return self.mlp_head(rows)


class LstmEncoder(nn.Module):
    """A bidirectional LSTM over the prompt rows, then a two-layer MLP back to the token dimension."""

    def __init__(self, dim: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.lstm_head = nn.LSTM(dim, hidden, num_layers=layers, dropout=dropout, bidirectional=True,
                                 batch_first=True)
        self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))

    def forward(self, rows):  # (1, n, d) -> (1, n, d)
        return self.mlp_head(self.lstm_head(rows)[0])


@register
class PTuning(Method):
    peft_type = PeftType.P_TUNING.value
    config_class = PromptEncoderConfig

    @classmethod
    def attach(cls, model: nn.Module, config: PromptEncoderConfig, adapter_name: str) -> PromptEmbedding:
        embeddings = prepare_virtual_tokens(model, config, adapter_name, "p-tuning")
        if config.encoder_hidden_size is None:
            config.encoder_hidden_size = config.token_dim
        dim, hidden = config.token_dim, config.encoder_hidden_size
        encoder = None
        if not is_loading():  # a saved adapter holds the encoder's output, not the encoder
            if config.encoder_reparameterization_type == PromptEncoderReparameterizationType.LSTM:
                encoder = LstmEncoder(dim, hidden, config.encoder_num_layers, config.encoder_dropout)
            else:
                encoder = MlpEncoder(dim, hidden)
        return PromptEmbedding(config, embeddings, encoder)
