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
from collections.abc import Iterator
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


class AdaptedAttention(nn.Module):
    """An attention module with Llama-Adapter prompts: the ecosystem's layout, so names carry over.

    ``model`` is the original attention module. ``adaption_prompt`` (1, adapter_len, hidden) and ``adaption_gate``
    (1,) are the tensors of the adapter shown here: the active one, or the last active. Other adapters' tensors
    wait in ``held_prompts`` / ``held_gates`` (the ecosystem keeps them outside the model; here ``.to()`` and
    ``state_dict`` still see them). The prompt is added only while ``live`` (set for each forward by the adapter).
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.register_parameter("adaption_prompt", None)  # registered first: the ecosystem's parameter order
        self.register_parameter("adaption_gate", None)
        self.model = attn
        self.held_prompts = nn.ParameterDict()
        self.held_gates = nn.ParameterDict()
        self.shown: str | None = None
        self.live = False
        self._cache: tuple[Any, torch.Tensor, torch.Tensor] | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # what the decoder layer or user code reads from its attention module
            modules = self.__dict__.get("_modules")
            if name == "model" or modules is None or "model" not in modules:
                raise
            return getattr(modules["model"], name)

    def add(self, name: str, prompt: nn.Parameter, gate: nn.Parameter) -> None:
        self.held_prompts[name], self.held_gates[name] = prompt, gate
        if self.shown is None:
            self.show(name)

    def tensors(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        if name == self.shown:
            return self.adaption_prompt, self.adaption_gate
        return self.held_prompts[name], self.held_gates[name]

    def show(self, name: str) -> None:
        """Register adapter ``name``'s tensors as ``adaption_prompt`` / ``adaption_gate`` (the others wait)."""
        if name == self.shown:
            return
        if self.shown is not None:
            self.held_prompts[self.shown], self.held_gates[self.shown] = self.adaption_prompt, self.adaption_gate
        self._parameters["adaption_prompt"] = self.held_prompts.pop(name)
        self._parameters["adaption_gate"] = self.held_gates.pop(name)
        self.shown = name
        self._cache = None

    def remove(self, name: str) -> None:
        if name == self.shown:
            self._parameters["adaption_prompt"] = self._parameters["adaption_gate"] = None
            self.shown, self.live, self._cache = None, False, None
            if len(self.held_prompts):
                self.show(next(iter(self.held_prompts.keys())))
        else:
            del self.held_prompts[name], self.held_gates[name]

    def __len__(self) -> int:
        return len(self.held_prompts) + (self.shown is not None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = self.model(*args, **kwargs)
        if not self.live or self.adaption_prompt is None:
            return output
        attn = self.model
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (B, T, hidden)
        cos, sin = kwargs["position_embeddings"]  # (B, T, d)
        out = output[0] if isinstance(output, tuple) else output  # (B, T, hidden)
        batch, length = hidden.shape[:2]
        dtype = hidden.dtype
        q = attn.q_proj(hidden).view(batch, length, -1, attn.head_dim).transpose(1, 2)  # (B, H, T, d)
        q = q * cos.unsqueeze(1) + _rotate_half(q) * sin.unsqueeze(1)
        k, v = self._prompt_kv(attn, dtype)
        groups = q.shape[1] // k.shape[1]
        if groups > 1:  # grouped-query attention: each prompt key/value head serves its group of query heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (1, H, L, d)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(attn.head_dim)  # (B, H, T, L)
        weights = self.adaption_gate.to(dtype) * F.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        mixed = torch.matmul(weights, v).transpose(1, 2).reshape(batch, length, -1)  # (B, T, H·d)
        out = out + attn.o_proj(mixed)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    def _prompt_kv(self, attn: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's keys and values, (1, kv_heads, adapter_len, head_dim) each.

        Without gradients (inference, decoding) they are kept until the prompt or the projections change, so a
        decode step does not project the prompt again."""
        prompt = self.adaption_prompt
        grad = torch.is_grad_enabled() and (prompt.requires_grad or any(
            p.requires_grad for p in (*attn.k_proj.parameters(), *attn.v_proj.parameters())))
        key = None
        # Adapters on the projections (LoRA on k_proj) change them without changing their parameters' versions when
        # switched or disabled: no reuse there.
        wrapped = isinstance(attn.k_proj, AdaptedLayer) or isinstance(attn.v_proj, AdaptedLayer)
        if not grad and not wrapped:
            projections = (*attn.k_proj.parameters(), *attn.v_proj.parameters())
            key = (dtype, prompt.device, id(prompt), prompt._version, torch.is_inference_mode_enabled(),
                   *(p._version for p in projections), *(id(p) for p in projections))
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1], self._cache[2]
        p = prompt.to(dtype)
        length = p.shape[1]
        k = attn.k_proj(p).view(1, length, -1, attn.head_dim).transpose(1, 2)  # (1, kv, L, d)
        v = attn.v_proj(p).view(1, length, -1, attn.head_dim).transpose(1, 2)  # (1, kv, L, d)
        if key is not None:
            self._cache = (key, k, v)
        return k, v


class AdaptionPrompts(ModelAdapter):
    """One adapter's prompts and gates: it wraps each adapted attention module in an :class:`AdaptedAttention`
    (shared with the other adapters of the model) that holds its tensors, and tells those wrappers when it applies.

    Attributes:
        paths: the adapted attention modules' paths.
    """

    bare_base_model = False  # the ecosystem keeps base_model.model (it wraps attention layers)

    def __init__(self, model: nn.Module, paths: list[str], adapter_len: int, name: str) -> None:
        super().__init__()
        self.paths = list(paths)
        self.name = name
        self._live = False
        hidden = model.config.hidden_size
        self._places: list[tuple[nn.Module, str, AdaptedAttention]] = []  # plain list: the wrappers live in the model
        for path in self.paths:
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            wrapper = getattr(parent, child)
            if not isinstance(wrapper, AdaptedAttention):
                wrapper = AdaptedAttention(wrapper)
                setattr(parent, child, wrapper)
            weight = wrapper.model.q_proj.weight
            dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) or \
                not weight.dtype.is_floating_point else weight.dtype
            # Standard normal prompts (the reference implementation's embedding init), a zero gate: the base model.
            prompt = nn.Parameter(torch.empty(1, adapter_len, hidden, device=weight.device, dtype=dtype).normal_())
            wrapper.add(name, prompt, nn.Parameter(torch.zeros(1, device=weight.device, dtype=dtype)))
            self._places.append((parent, child, wrapper))

    @property  # type: ignore[override]
    def live(self) -> bool:
        return self._live

    @live.setter
    def live(self, value: bool) -> None:  # the applying adapter is the one shown in each wrapper
        self._live = value
        for _, _, wrapper in self._places:
            if value:
                wrapper.show(self.name)
                wrapper.live = True
            elif wrapper.shown == self.name:
                wrapper.live = False

    def show(self) -> None:
        """Make this adapter's tensors the wrappers' ``adaption_prompt`` / ``adaption_gate``."""
        for _, _, wrapper in self._places:
            wrapper.show(self.name)

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        """This adapter's prompts and gates (held by the wrappers in the model, so not registered here)."""
        lead = f"{prefix}." if prefix else ""
        for i, (_, _, wrapper) in enumerate(self._places):
            prompt, gate = wrapper.tensors(self.name)
            yield f"{lead}{i}.adaption_prompt", prompt
            yield f"{lead}{i}.adaption_gate", gate

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        for _, param in self.named_parameters():
            yield param

    def detach(self) -> None:
        for parent, child, wrapper in self._places:
            wrapper.remove(self.name)
            if not len(wrapper) and getattr(parent, child, None) is wrapper:
                setattr(parent, child, wrapper.model)
        self._places = []

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for path, (_, _, wrapper) in zip(self.paths, self._places):
            prompt, gate = wrapper.tensors(self.name)
            out[f"base_model.model.{path}.adaption_prompt"] = prompt
            out[f"base_model.model.{path}.adaption_gate"] = gate
        return out


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
            attn = attn.model if isinstance(attn, AdaptedAttention) else attn
            missing = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim") if not hasattr(attn, n)]
            if missing:
                raise UnsupportedError(f"'{path}' ({type(attn).__name__}) has no {missing}: it is not a Llama-family "
                                       "attention module; set target_modules to the attention modules' name")
        return AdaptionPrompts(model, paths, config.adapter_len, adapter_name)
