"""Prefix tuning (Li and Liang 2021): trained keys and values in front of every attention layer's cache.

::

    P (n × 2·layers·d, trained) ──view──► for each layer ℓ: K_ℓ, V_ℓ  (B, heads, n, d/heads)
                                                  │
    input_ids ──► base model, attending to [prefix K/V │ its own K/V]     attention mask: [1 … 1 │ mask]

The prefix reaches the model as a ready-filled KV cache (``cache``, formerly ``past_key_values``), so the
model's layers run unchanged and the logits cover the real tokens only. With ``prefix_projection`` the prefix
is produced by a two-layer MLP (d → encoder_hidden_size → 2·layers·d, tanh) from ``n × d`` trained rows while
training; what is saved (``prompt_embeddings``, n × 2·layers·d, the ecosystem's layout: per token, layer by
layer, key then value, head by head) is always the prefix itself. For grouped-query attention ``d`` is
``head_dim × num_key_value_heads``.

``generate`` passes the prefix cache with ``n`` stand-in tokens in front of the input ids, so transformers
treats the prefix as an already processed part of the sequence: positions, masks and the cache all line up,
and a left-padded row generates what it generates alone.

On encoder-decoder models (``num_transformer_submodules=2``) the prefix goes to the decoder's self-attention only,
in the layout HF peft computes there (see :meth:`PrefixEncoder.cache`); the encoder and the cross-attention run as
usual, and ``generate`` starts the decoder on top of the prefix cache.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PeftType, PromptLearningConfig
from ..errors import ConfigError, UnsupportedError, UsageError
from ..inject import add_modules_to_save
from ..layer import ModelAdapter
from ..registry import Method, is_loading, register
from .prompt_tuning import _generation_rows, _takes, cache_keyword


@dataclasses.dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Config of a prefix-tuning adapter (field names and meanings as in the HF ecosystem).

    Args:
        prefix_projection: produce the prefix with a two-layer MLP while training.
        encoder_hidden_size: that MLP's hidden size (the model's key/value width when ``None``).
        init_weights: ``None`` (random prefix) or ``"zero"`` (a zero prefix; with projection, a zero last layer).
    """

    peft_type: str | PeftType | None = PeftType.PREFIX_TUNING
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None

    bookkeeping_fields: ClassVar[frozenset[str]] = PromptLearningConfig.bookkeeping_fields | {"init_weights"}

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.PREFIX_TUNING
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"PrefixTuningConfig.init_weights must be None or 'zero', got {self.init_weights!r}")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ConfigError("PrefixTuningConfig.encoder_hidden_size must be a positive integer, got "
                              f"{self.encoder_hidden_size}")


class PrefixEncoder(ModelAdapter):
    """The trained prefix of one adapter, handed to the model as a KV cache.

    Attributes:
        embedding: the prefix rows (n × 2·layers·d), or with a projection the MLP's input rows (n × d).
        transform: the projection MLP, or ``None``.
    """

    def __init__(self, config: PrefixTuningConfig, device: torch.device, projection: bool) -> None:
        super().__init__()
        n, d, layers = config.num_virtual_tokens, config.token_dim, config.num_layers
        width = layers * 2 * d
        kw = {"device": device, "dtype": torch.float32}
        self.transform: nn.Module | None = None
        if projection:
            self.embedding = nn.Embedding(n, d, **kw)
            hidden = config.encoder_hidden_size
            self.transform = nn.Sequential(nn.Linear(d, hidden, **kw), nn.Tanh(), nn.Linear(hidden, width, **kw))
            last = self.transform[-1]
        else:
            self.embedding = nn.Embedding(n, width, **kw)
            last = self.embedding
        if config.init_weights == "zero":
            with torch.no_grad():
                for param in last.parameters():
                    param.zero_()
        self.num_tokens, self.layers, self.heads = n, layers, config.num_attention_heads
        self.head_dim = d // config.num_attention_heads

    def rows(self) -> torch.Tensor:
        """The prefix, (n, 2·layers·d)."""
        weight = self.embedding.weight
        return weight if self.transform is None else self.transform(weight)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.rows() if self.transform is None else self.rows().detach()}

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.transform is not None:  # the saved prefix replaces the projection
            warnings.warn("loading a saved prefix into a projected prefix-tuning adapter: the projection is dropped "
                          "and training continues on the prefix directly", stacklevel=4)
            rows = tensors["prompt_embeddings"]
            grad = self.embedding.weight.requires_grad
            self.embedding = nn.Embedding(*rows.shape, device=self.embedding.weight.device, dtype=torch.float32)
            self.embedding.weight.requires_grad_(grad)
            self.transform = None
        super().load_saved(tensors)

    def cache(self, model: nn.Module, batch: int, dtype: torch.dtype) -> Any:
        """A fresh KV cache holding the prefix for ``batch`` rows.

        Decoder-only models: layer ℓ gets entries 2ℓ (keys) and 2ℓ+1 (values). Encoder-decoder models: the prefix
        goes to the decoder's self-attention only, and layer ℓ reads entries 4ℓ and 4ℓ+1 (mod 2·layers): the layout
        HF peft computes for them (its two-submodule view repeats the entries and takes them four at a time), kept so
        that adapters move between the libraries with equal outputs. Half of the stored entries are unused there.
        """
        from transformers import DynamicCache, EncoderDecoderCache

        n, two_l = self.num_tokens, self.layers * 2
        kv = self.rows().to(dtype).view(n, two_l, self.heads, self.head_dim).permute(1, 2, 0, 3)
        seq2seq = getattr(model.config, "is_encoder_decoder", False)
        cache = DynamicCache(config=model.config)  # kv: (2·layers, heads, n, head_dim)
        for layer in range(self.layers):
            first = (4 * layer) % two_l if seq2seq else 2 * layer
            key = kv[first].unsqueeze(0).expand(batch, -1, -1, -1)  # (B, heads, n, head_dim)
            value = kv[first + 1].unsqueeze(0).expand(batch, -1, -1, -1)
            cache.update(key, value, layer)
        if seq2seq:  # the cross-attention keys come from the encoder output, as usual
            return EncoderDecoderCache(cache, DynamicCache(config=model.config))
        return cache

    def prepare(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        if getattr(model.config, "is_encoder_decoder", False):
            return self._prepare_seq2seq(model, inputs)
        first = inputs.get("input_ids")
        if first is None:
            first = inputs.get("inputs_embeds")
        if first is None:
            raise UsageError("a prefix-tuning adapter needs input_ids or inputs_embeds")
        batch, length = first.shape[:2]
        n = self.num_tokens
        key = cache_keyword(model)
        past = inputs.get(key, inputs.get("past_key_values"))
        past_len = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
        if past_len == 0:  # a new sequence: the prefix is its cache
            inputs.pop("past_key_values", None)
            inputs[key] = self.cache(model, batch, _compute_dtype(model))
            past_len = n
        mask = inputs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.shape[1] + n == past_len + length:
            mask = torch.cat([mask.new_ones(batch, n), mask], dim=1)  # (B, n + past + L)
            inputs["attention_mask"] = mask
        if mask is not None and mask.dim() == 2 and inputs.get("position_ids") is None \
                and _takes(model, "position_ids"):
            # Positions count the tokens each row really has, so a left-padded row matches the row alone.
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        return inputs

    def _prepare_seq2seq(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """The decoder's self-attention gets the prefix (a new sequence gets it as its cache); the decoder's attention
        mask, when given, gets n ones in front."""
        key = cache_keyword(model)
        past = inputs.get(key, inputs.get("past_key_values"))
        if past is None or past.get_seq_length() == 0:
            source = next((inputs[k] for k in ("input_ids", "inputs_embeds", "decoder_input_ids") if
                           inputs.get(k) is not None), None)
            if source is None:
                raise UsageError("a prefix-tuning adapter needs input_ids, inputs_embeds or decoder_input_ids")
            inputs.pop("past_key_values", None)
            inputs[key] = self.cache(model, source.shape[0], _compute_dtype(model))
            decoder_mask = inputs.get("decoder_attention_mask")
            if decoder_mask is not None:
                inputs["decoder_attention_mask"] = torch.cat(
                    [decoder_mask.new_ones(decoder_mask.shape[0], self.num_tokens), decoder_mask], dim=1)
        return inputs

    def generate(self, model: nn.Module, inputs: dict[str, Any]) -> Any:
        if getattr(model.config, "is_encoder_decoder", False):
            return self._generate_seq2seq(model, inputs)
        ids = inputs.pop("input_ids", None)
        if ids is None or inputs.get("inputs_embeds") is not None:
            raise UsageError("generate with a prefix-tuning adapter takes input_ids (not inputs_embeds)")
        batch, n = ids.shape[0], self.num_tokens
        mask = inputs.pop("attention_mask", None)
        if mask is None:
            mask = torch.ones_like(ids)
        rows = batch * _generation_rows(model, inputs)  # generate repeats each row; the cache must match
        # n stand-in tokens (the row's first token) take the prefix's place: generate sees them as already cached.
        inputs["input_ids"] = torch.cat([ids[:, :1].expand(batch, n), ids], dim=1)
        inputs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        inputs[cache_keyword(model)] = self.cache(model, rows, _compute_dtype(model))
        out = model.generate(**inputs)
        if hasattr(out, "sequences"):
            out.sequences = out.sequences[:, n:]
            return out
        return out[:, n:]


    def _generate_seq2seq(self, model: nn.Module, inputs: dict[str, Any]) -> Any:
        """The decoder starts from the prefix cache; unlike the decoder-only path no stand-in tokens are needed:
        generate feeds an encoder-decoder's decoder the tokens it is given on top of the cache."""
        ids = inputs.get("input_ids")
        if ids is None:
            raise UsageError("generate with a prefix-tuning adapter takes input_ids")
        rows = ids.shape[0] * _generation_rows(model, inputs)  # generate repeats each row; the cache must match
        inputs[cache_keyword(model)] = self.cache(model, rows, _compute_dtype(model))
        return model.generate(**inputs)


def _check_fit(config: PrefixTuningConfig, model_side: PrefixTuningConfig, model_config: Any, name: str) -> None:
    """The prefix must have the shape of the model's KV cache: one key and one value per attention layer, each
    ``num_key_value_heads × head_dim`` wide. ``token_dim`` / ``num_attention_heads`` may be given in the
    key/value heads' terms (what is saved) or in all heads' terms (``hidden_size`` / ``num_attention_heads``, which
    is then converted to the former); anything else (a value typed by hand, a file saved on another model) is an
    error here instead of a shape error from transformers at every forward.

    Raises:
        ConfigError: ``num_layers``, ``token_dim`` or ``num_attention_heads`` does not fit the model.
    """
    if config.num_layers != model_side.num_layers:
        raise ConfigError(f"PrefixTuningConfig.num_layers={config.num_layers}, but {name} has {model_side.num_layers} "
                          "attention layers; leave num_layers unset (an adapter saved on another model does not fit)")
    heads, hidden = model_side.num_attention_heads, model_side.token_dim
    kv_heads = getattr(model_config, "text_config", None) or model_config
    kv_heads = getattr(kv_heads, "num_key_value_heads", None)
    kv_heads = kv_heads if isinstance(kv_heads, int) and kv_heads > 0 else heads
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    cache_form = (head_dim * kv_heads, kv_heads)  # what the KV cache holds, and what is saved
    if (config.token_dim, config.num_attention_heads) not in (cache_form, (head_dim * heads, heads)):
        raise ConfigError(
            f"PrefixTuningConfig.token_dim={config.token_dim} with num_attention_heads={config.num_attention_heads} "
            f"does not fit {name}'s KV cache ({kv_heads} key/value heads of {head_dim}: token_dim={cache_form[0]}, "
            f"num_attention_heads={kv_heads}); leave both unset (an adapter saved on another model does not fit)"
        )
    config.token_dim, config.num_attention_heads = cache_form


def _compute_dtype(model: nn.Module) -> torch.dtype:
    weight = model.get_input_embeddings().weight
    return weight.dtype if weight.dtype.is_floating_point else torch.float32


@register
class PrefixTuning(Method):
    peft_type = PeftType.PREFIX_TUNING.value
    config_class = PrefixTuningConfig

    @classmethod
    def attach(cls, model: nn.Module, config: PrefixTuningConfig, adapter_name: str) -> PrefixEncoder:
        model_config = getattr(model, "config", None)
        name = type(model).__name__
        if not (_takes(model, "cache") or _takes(model, "past_key_values")):
            raise UnsupportedError(f"{name} takes no KV cache (past_key_values), so it cannot take a prefix; use "
                                   "prompt tuning or LoRA")
        model_side = dataclasses.replace(config, token_dim=None, num_attention_heads=None, num_layers=None)
        model_side.fill_from_model(model)  # what the model's own config says
        config.fill_from_model(model)
        if getattr(model_config, "is_encoder_decoder", False) and config.num_transformer_submodules != 2:
            raise ConfigError(f"prefix tuning on an encoder-decoder model ({name}) uses num_transformer_submodules=2 "
                              f"(the ecosystem's layout there), got {config.num_transformer_submodules}; leave it "
                              "unset")
        _check_fit(config, model_side, model_config, name)
        if config.encoder_hidden_size is None:
            config.encoder_hidden_size = config.token_dim
        add_modules_to_save(model, config.modules_to_save, adapter_name)
        device = model.get_input_embeddings().weight.device
        return PrefixEncoder(config, device, projection=config.prefix_projection and not is_loading())
