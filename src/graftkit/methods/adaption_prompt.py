"""Llama-Adapter: adaption prompts with zero-initialised gates (Zhang et al. 2023).

::

    attention layer ℓ (one of the top ``adapter_layers``):

        h ──► self-attention (unchanged, with its KV cache) ──► o ──(+)──► o + g_ℓ · W_o · softmax(q Kᵀ/√d) V

        K = W_k P_ℓ,  V = W_v P_ℓ      (P_ℓ: adapter_len × hidden, the layer's learned prompt)

Each adapted layer learns a prompt P_ℓ and a gate g_ℓ. The layer's queries q (the token's own, rotary
embeddings applied) attend over the prompt's keys in a softmax of their own, and the gated result is projected
by the layer's output projection and added to the attention output. The gate starts at 0, so the adapted
model starts exactly equal to the base model. The prompt's keys and values never enter the KV cache, so
``generate()`` and its cache work unchanged; with grouped-query attention the prompt's key/value heads are
shared by their query heads as the model shares its own.

Supported: the Llama-family attention of transformers (``q_proj``/``k_proj``/``v_proj``/``o_proj`` and rotary
``position_embeddings``): Llama (SmolLM2), Mistral, Qwen2. Saved tensors: ``<attention path>.adaption_prompt``
(1, adapter_len, hidden) and ``<attention path>.adaption_gate`` (1,), the ecosystem's format.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PeftConfig, PeftType
from ..errors import ConfigError, UnsupportedError
from ..layer import AdaptedLayer, ModelAdapter
from ..registry import Method, register

SUPPORTED = ("llama", "mistral", "qwen2")


@dataclasses.dataclass
class AdaptionPromptConfig(PeftConfig):
    """Config of a Llama-Adapter (field names and meanings as in the HF ecosystem).

    Args:
        target_modules: the name of the attention modules inside each decoder layer (``"self_attn"`` when ``None``).
        adapter_len: prompt length per adapted layer (required, > 0).
        adapter_layers: how many of the top attention layers get a prompt (required, > 0).
    """

    peft_type: str | PeftType | None = PeftType.ADAPTION_PROMPT
    target_modules: str | None = None
    adapter_len: int | None = None
    adapter_layers: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.ADAPTION_PROMPT
        for field in ("adapter_len", "adapter_layers"):  # None until the config is used (checked at attach)
            value = getattr(self, field)
            if value is not None and value <= 0:
                raise ConfigError(f"AdaptionPromptConfig.{field} must be a positive integer, got {value!r} "
                                  "(e.g. adapter_len=10, adapter_layers=30)")
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("AdaptionPromptConfig.target_modules must name the attention modules, e.g. 'self_attn'")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class AdaptionPrompts(ModelAdapter):
    """The prompts and gates of one adapter, and the hooks that apply them to the attention modules' outputs.

    Attributes:
        prompts / gates: one (1, adapter_len, hidden) prompt and one (1,) gate per adapted attention module.
        paths: the adapted attention modules' paths, in the same order.
    """

    bare_base_model = False  # the ecosystem keeps base_model.model (it wraps attention layers)

    def __init__(self, model: nn.Module, paths: list[str], adapter_len: int) -> None:
        super().__init__()
        self.paths = list(paths)
        config = model.config
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.prompts = nn.ParameterList()
        self.gates = nn.ParameterList()
        self._handles: list[Any] = []
        self._cache: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}
        this = weakref.ref(self)
        for i, path in enumerate(self.paths):
            attn = model.get_submodule(path)
            weight = attn.q_proj.weight
            dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) or \
                not weight.dtype.is_floating_point else weight.dtype
            # Standard normal prompts (the reference implementation's embedding init), a zero gate: the base model.
            self.prompts.append(nn.Parameter(torch.empty(1, adapter_len, hidden, device=weight.device,
                                                         dtype=dtype).normal_()))
            self.gates.append(nn.Parameter(torch.zeros(1, device=weight.device, dtype=dtype)))

            def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any, i: int = i) -> Any:
                adapter = this()
                if adapter is None or not adapter.live:
                    return output
                return adapter._add_prompt(i, module, args, kwargs, output)

            self._handles.append(attn.register_forward_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for path, prompt, gate in zip(self.paths, self.prompts, self.gates):
            out[f"base_model.model.{path}.adaption_prompt"] = prompt
            out[f"base_model.model.{path}.adaption_gate"] = gate
        return out

    def _prompt_kv(self, i: int, attn: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's keys and values for layer ``i``, (1, kv_heads, adapter_len, head_dim) each.

        Without gradients (inference, decoding) they are kept until the prompt or the projections change, so a
        decode step does not project the prompt again."""
        prompt = self.prompts[i]
        grad = torch.is_grad_enabled() and (prompt.requires_grad or any(
            p.requires_grad for p in (*attn.k_proj.parameters(), *attn.v_proj.parameters())))
        key = None
        # Adapters on the projections (LoRA on k_proj) change them without changing their parameters' versions when
        # switched or disabled: no reuse there.
        wrapped = isinstance(attn.k_proj, AdaptedLayer) or isinstance(attn.v_proj, AdaptedLayer)
        if not grad and not wrapped:
            key = (dtype, prompt.device, prompt._version, torch.is_inference_mode_enabled(),
                   *(p._version for p in attn.k_proj.parameters()), *(p._version for p in attn.v_proj.parameters()),
                   *(id(p) for p in attn.k_proj.parameters()), *(id(p) for p in attn.v_proj.parameters()))
            hit = self._cache.get(i)
            if hit is not None and hit[0] == key:
                return hit[1], hit[2]
        p = prompt.to(dtype)
        length = p.shape[1]
        k = attn.k_proj(p).view(1, length, -1, attn.head_dim).transpose(1, 2)  # (1, kv, L, d)
        v = attn.v_proj(p).view(1, length, -1, attn.head_dim).transpose(1, 2)  # (1, kv, L, d)
        if key is not None:
            self._cache[i] = (key, k, v)
        return k, v

    def _add_prompt(self, i: int, attn: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (B, T, hidden)
        cos, sin = kwargs["position_embeddings"]  # (B, T, d)
        out = output[0] if isinstance(output, tuple) else output  # (B, T, hidden)
        batch, length = hidden.shape[:2]
        dtype = hidden.dtype
        q = attn.q_proj(hidden).view(batch, length, -1, attn.head_dim).transpose(1, 2)  # (B, H, T, d)
        q = q * cos.unsqueeze(1) + _rotate_half(q) * sin.unsqueeze(1)
        k, v = self._prompt_kv(i, attn, dtype)
        groups = q.shape[1] // k.shape[1]
        if groups > 1:  # grouped-query attention: each prompt key/value head serves its group of query heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (1, H, L, d)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(attn.head_dim)  # (B, H, T, L)
        weights = self.gates[i].to(dtype) * F.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        mixed = torch.matmul(weights, v).transpose(1, 2).reshape(batch, length, -1)  # (B, T, H·d)
        out = out + attn.o_proj(mixed)
        return (out, *output[1:]) if isinstance(output, tuple) else out


@register
class AdaptionPrompt(Method):
    peft_type = PeftType.ADAPTION_PROMPT.value
    config_class = AdaptionPromptConfig
    default_targets: ClassVar[dict[str, list[str]]] = {}

    @classmethod
    def attach(cls, model: nn.Module, config: AdaptionPromptConfig, adapter_name: str) -> AdaptionPrompts:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in SUPPORTED:
            raise UnsupportedError(
                f"Llama-Adapter (adaption prompts) supports the Llama-family attention of {list(SUPPORTED)}; "
                f"{type(model).__name__} has model_type={model_type!r}. Use LoRA or prompt tuning for this model"
            )
        missing = [f for f in ("adapter_len", "adapter_layers") if getattr(config, f) is None]
        if missing:
            raise ConfigError(f"AdaptionPromptConfig.{missing[0]} is required to add the adapter: a positive integer "
                              "(e.g. adapter_len=10, adapter_layers=30)")
        if config.target_modules is None:
            config.target_modules = "self_attn"
        name = config.target_modules
        paths = [path for path, _ in model.named_modules() if path.endswith(f".{name}")]
        if len(paths) < config.adapter_layers:
            raise ConfigError(
                f"AdaptionPromptConfig.adapter_layers={config.adapter_layers} but {type(model).__name__} has "
                f"{len(paths)} '{name}' modules; lower adapter_layers (or check target_modules)"
            )
        paths = paths[-config.adapter_layers:]  # the top layers
        for path in paths:
            attn = model.get_submodule(path)
            missing = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim") if not hasattr(attn, n)]
            if missing:
                raise UnsupportedError(f"'{path}' ({type(attn).__name__}) has no {missing}: it is not a Llama-family "
                                       "attention module; set target_modules to the attention modules' name")
        return AdaptionPrompts(model, paths, config.adapter_len)
