"""Prompt tuning (Lester et al. 2021): ``n`` trainable virtual token embeddings in front of every input.

::

    input_ids ──► word embeddings ──┐
                                    ├── [p₁ … pₙ │ e(x₁) … e(x_L)] ──► base model (frozen)
    P (n × d, trained) ─────────────┘
                 attention mask:  [1 … 1 │ mask]     labels: [-100 … -100 │ labels]

The base model is untouched: the adapter only rewrites the inputs of each call (see
:class:`~graftkit.layer.ModelAdapter`), so ``disable_adapter()`` gives the base model bit for bit. Positions
follow the extended attention mask (a left-padded row sees the positions it would see alone), and ``generate``
feeds the virtual tokens as input embeddings on the first step only, so the KV cache holds them afterwards.

On encoder-decoder models the virtual tokens go in front of the encoder's inputs only (the decoder's inputs and
the labels are left as they are), as in HF peft; with ``num_transformer_submodules=2``, the ecosystem's default
there, the adapter holds 2n rows of which the first n are used.

On disk the prompt is the tensor ``prompt_embeddings`` (n·submodules × d), as in the ecosystem's format.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import math
import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PeftType, PromptLearningConfig
from ..errors import ConfigError, MissingPackageError, UnsupportedError, UsageError
from ..inject import add_modules_to_save
from ..layer import ModelAdapter
from ..registry import Method, is_loading, register


class PromptTuningInit(str, enum.Enum):
    """How the virtual tokens start: embeddings of a text, of random vocabulary tokens, or random vectors."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


@dataclasses.dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Config of a prompt-tuning adapter (field names and meanings as in the HF ecosystem).

    Args:
        prompt_tuning_init: ``"RANDOM"`` (standard normal vectors), ``"SAMPLE_VOCAB"`` (embeddings of random
            vocabulary tokens) or ``"TEXT"`` (embeddings of ``prompt_tuning_init_text``, repeated or cut to
            ``num_virtual_tokens``).
        prompt_tuning_init_text: the text of ``"TEXT"`` initialisation.
        tokenizer_name_or_path: a local tokenizer folder (or a Hub id in the local cache) for ``"TEXT"``.
        tokenizer_kwargs: extra arguments for ``AutoTokenizer.from_pretrained`` (``"TEXT"`` only; remote code is
            never enabled).
    """

    peft_type: str | PeftType | None = PeftType.PROMPT_TUNING
    prompt_tuning_init: str | PromptTuningInit = PromptTuningInit.RANDOM
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None

    # How the prompt started says nothing about what a trained prompt computes.
    bookkeeping_fields: ClassVar[frozenset[str]] = PromptLearningConfig.bookkeeping_fields | {
        "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"}

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.PROMPT_TUNING
        choices = [c.value for c in PromptTuningInit]
        init = str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init))
        if init not in choices:
            raise ConfigError(f"PromptTuningConfig.prompt_tuning_init must be one of {choices}, got {init!r}")
        self.prompt_tuning_init = PromptTuningInit(init)
        if init == "TEXT" and not (self.prompt_tuning_init_text and self.tokenizer_name_or_path):
            missing = [f for f in ("prompt_tuning_init_text", "tokenizer_name_or_path") if not getattr(self, f)]
            raise ConfigError(f"prompt_tuning_init='TEXT' needs {' and '.join(missing)}: the text whose token "
                              "embeddings start the prompt, and a local tokenizer folder to split it")
        if self.tokenizer_kwargs and init != "TEXT":
            raise ConfigError("tokenizer_kwargs is only used with prompt_tuning_init='TEXT'")


def _start_values(config: PromptTuningConfig, embeddings: nn.Embedding, total: int) -> torch.Tensor | None:
    """Initial prompt rows (total × d), or ``None`` for standard-normal vectors."""
    init = config.prompt_tuning_init
    if init == PromptTuningInit.RANDOM or is_loading():
        return None
    if init == PromptTuningInit.SAMPLE_VOCAB:
        ids = torch.randint(0, embeddings.num_embeddings, (total,))
    else:
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:  # pragma: no cover - transformers is a dependency
            raise MissingPackageError("TEXT initialisation needs transformers: pip install transformers") from exc
        kwargs = {k: v for k, v in (config.tokenizer_kwargs or {}).items() if k != "trust_remote_code"}
        try:
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"tokenizer_name_or_path={config.tokenizer_name_or_path!r}: cannot load a tokenizer "
                              f"there ({str(exc).splitlines()[0][:160]}); pass a local tokenizer folder") from None
        text_ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
        if not text_ids:
            raise ConfigError("prompt_tuning_init_text gives no tokens; pass a non-empty text")
        ids = torch.tensor((text_ids * math.ceil(total / len(text_ids)))[:total])
    with torch.no_grad():
        return embeddings(ids.to(embeddings.weight.device)).detach().float()


class PromptEmbedding(ModelAdapter):
    """The trained virtual tokens of one adapter and the input rewriting they need.

    Attributes:
        embedding: ``nn.Embedding(n, d)``: the prompt itself (fp32 master, cast to the activation dtype), or the
            input of ``encoder`` when the method reparameterizes the prompt (p-tuning).
        encoder: ``None``, or a module mapping the embedding rows (1, n, d) to the prompt rows (1, n, d). On disk
            the prompt is always saved as the computed rows, so a loaded adapter has no encoder. Its parts are
            registered on this adapter under their own names (``mlp_head``, ``lstm_head``), as the ecosystem names
            them in memory.
    """

    def __init__(self, config: PromptLearningConfig, word_embeddings: nn.Embedding, encoder: nn.Module | None = None
                 ) -> None:
        super().__init__()
        total = config.num_virtual_tokens * config.num_transformer_submodules
        weight = word_embeddings.weight
        self.embedding = nn.Embedding(total, config.token_dim, device=weight.device, dtype=torch.float32)
        start = _start_values(config, word_embeddings, total) if isinstance(config, PromptTuningConfig) else None
        if start is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(start)
        self.__dict__["encoder"] = encoder.to(weight.device) if encoder is not None else None  # not a submodule:
        for name, part in (encoder.named_children() if encoder is not None else ()):  # its parts are, by their names
            self.add_module(name, part)
        self.num_tokens = config.num_virtual_tokens  # in front of the inputs (of the encoder, on encoder-decoders)

    def rows(self) -> torch.Tensor:
        """The prompt, (n, d)."""
        if self.encoder is None:
            return self.embedding.weight
        return self.encoder(self.embedding.weight.unsqueeze(0))[0]

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.rows() if self.encoder is None else self.rows().detach()}

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.encoder is not None:  # saved rows replace the encoder: training goes on from the prompt itself
            warnings.warn("loading saved prompt rows into a reparameterized prompt adapter: the encoder is dropped "
                          "and training continues on the prompt rows directly", stacklevel=4)
            for name, _ in self.encoder.named_children():
                delattr(self, name)
            self.__dict__["encoder"] = None
        super().load_saved(tensors)

    def _prompt(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        return self.rows()[:self.num_tokens].to(dtype).unsqueeze(0).expand(batch, -1, -1)  # (B, n, d)

    def _embed(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids = inputs.pop("input_ids", None)
        embeds = inputs.pop("inputs_embeds", None)
        if embeds is None:
            if ids is None:
                raise UsageError("a prompt-tuning adapter needs input_ids or inputs_embeds")
            embeds = model.get_input_embeddings()(ids)  # (B, L, d)
        return embeds, ids

    def prepare(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        if getattr(model.config, "is_encoder_decoder", False):
            return self._prepare_seq2seq(model, inputs)
        embeds, _ = self._embed(model, inputs)
        batch, length = embeds.shape[:2]
        n = self.num_tokens
        inputs["inputs_embeds"] = torch.cat([self._prompt(batch, embeds.dtype), embeds], dim=1)  # (B, n+L, d)
        mask = inputs.get("attention_mask")
        if mask is not None:
            mask = torch.cat([mask.new_ones(batch, n), mask], dim=1)  # (B, n+L)
            inputs["attention_mask"] = mask
        labels = inputs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() >= 2 and tuple(labels.shape[:2]) == (batch, length):
            inputs["labels"] = torch.cat([labels.new_full((batch, n, *labels.shape[2:]), -100), labels], dim=1)
        token_types = inputs.get("token_type_ids")
        if token_types is not None:
            inputs["token_type_ids"] = torch.cat([token_types.new_zeros(batch, n), token_types], dim=1)
        positions = inputs.get("position_ids")
        if positions is not None:
            front = torch.arange(n, device=positions.device).expand(positions.shape[0], n)
            inputs["position_ids"] = torch.cat([front, positions + n], dim=1)
        elif mask is not None and mask.dim() == 2 and _takes(model, "position_ids"):
            # Positions count the tokens each row really has, so a left-padded row matches the row alone.
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return inputs

    def _prepare_seq2seq(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """The encoder's inputs get the virtual tokens; the decoder's inputs and the labels stay as they are.

        With ``num_transformer_submodules=2`` (the ecosystem's default for encoder-decoder models) the adapter
        holds 2n rows and, as in HF peft, only the first n are used.
        """
        embeds, _ = self._embed(model, inputs)
        batch, n = embeds.shape[0], self.num_tokens
        inputs["inputs_embeds"] = torch.cat([self._prompt(batch, embeds.dtype), embeds], dim=1)  # (B, n+L, d)
        mask = inputs.get("attention_mask")
        if mask is not None:
            inputs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        return inputs

    def generate(self, model: nn.Module, inputs: dict[str, Any]) -> Any:
        seq2seq = getattr(model.config, "is_encoder_decoder", False)
        embeds, ids = self._embed(model, inputs)
        batch, length = embeds.shape[:2]
        mask = inputs.pop("attention_mask", None)
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
        inputs["inputs_embeds"] = torch.cat([self._prompt(batch, embeds.dtype), embeds], dim=1)
        inputs["attention_mask"] = torch.cat([mask.new_ones(batch, self.num_tokens), mask], dim=1)
        out = model.generate(**inputs)
        if ids is None or seq2seq:  # an encoder-decoder model returns the decoder's tokens, as usual
            return out
        # Given input embeddings, generate returns the new tokens only; put the input ids in front, as it does
        # for input_ids (rows repeat for beams and num_return_sequences).
        sequences = out.sequences if hasattr(out, "sequences") else out
        full = torch.cat([ids.repeat_interleave(sequences.shape[0] // batch, dim=0), sequences], dim=1)
        if hasattr(out, "sequences"):
            out.sequences = full
            return out
        return full


def _generation_rows(model: nn.Module, inputs: dict[str, Any]) -> int:
    """How many rows ``generate`` makes of each input row (beams, or returned sequences when sampling)."""
    config = inputs.get("generation_config") or model.generation_config
    beams = inputs.get("num_beams", getattr(config, "num_beams", 1)) or 1
    returned = inputs.get("num_return_sequences", getattr(config, "num_return_sequences", 1)) or 1
    return beams if beams > 1 else returned


def cache_keyword(model: nn.Module) -> str:
    """The name under which the model takes a KV cache (``cache`` since transformers 5.x, ``past_key_values``
    before)."""
    return "cache" if _takes(model, "cache") else "past_key_values"


def _takes(model: nn.Module, name: str) -> bool:
    return name in _forward_parameters(type(model))


@functools.cache
def _forward_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)  # read once per model class, not per call


@register
class PromptTuning(Method):
    peft_type = PeftType.PROMPT_TUNING.value
    config_class = PromptTuningConfig

    @classmethod
    def attach(cls, model: nn.Module, config: PromptTuningConfig, adapter_name: str) -> PromptEmbedding:
        embeddings = prepare_virtual_tokens(model, config, adapter_name, "prompt tuning")
        return PromptEmbedding(config, embeddings)


def prepare_virtual_tokens(model: nn.Module, config: PromptLearningConfig, adapter_name: str, what: str
                           ) -> nn.Embedding:
    """Checks and fills ``config`` for virtual tokens in front of ``model``'s token embeddings, adds its
    ``modules_to_save``, and returns the word embeddings.

    Raises:
        UnsupportedError: no input embedding layer.
        ConfigError: a ``token_dim`` that is not the model's.
    """
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if not isinstance(embeddings, nn.Embedding):
        raise UnsupportedError(f"{type(model).__name__} has no input embedding layer (get_input_embeddings()); "
                               f"{what} puts virtual tokens in front of the token embeddings")
    config.fill_from_model(model)
    if config.num_transformer_submodules not in (1, 2) or (
            config.num_transformer_submodules == 2 and not getattr(model.config, "is_encoder_decoder", False)):
        raise ConfigError(f"{type(config).__name__}.num_transformer_submodules={config.num_transformer_submodules}: "
                          "use 1, or 2 on an encoder-decoder model (virtual tokens before the encoder and the "
                          "decoder inputs)")
    if config.token_dim != embeddings.embedding_dim:
        raise ConfigError(f"{type(config).__name__}.token_dim={config.token_dim} but the model's token embeddings "
                          f"have {embeddings.embedding_dim} dimensions; leave token_dim unset")
    add_modules_to_save(model, config.modules_to_save, adapter_name)
    return embeddings
