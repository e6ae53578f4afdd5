"""``ensure_weight_tying``: adapters on an input embedding and the output layer tied to it stay one matrix."""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import nn

from ...errors import PeftWarning, UnsupportedError
from ...layer import AdaptedLayer, LayerAdapter, ModulesToSave
from .config import LoraConfig
from .layers import LoraEmbedding
from .tokens import _base_of


def _tied_heads(model: nn.Module) -> tuple[str | None, list[str]]:
    """The input embedding's path and the paths of the other layers whose weight is that embedding's weight (a tied
    output layer), wrapped or not."""
    from ...inject import iter_modules

    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    embedding = _base_of(embedding) if isinstance(embedding, nn.Module) else None
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None, []
    embed_path, heads = None, []
    for path, module in iter_modules(model):
        base = _base_of(module.original_module) if isinstance(module, ModulesToSave) else _base_of(module)
        if not path or getattr(base, "weight", None) is not weight:
            continue
        if base is embedding:
            embed_path = embed_path or path
        elif path not in heads:
            heads.append(path)
    return embed_path, heads


def _names_any(patterns: Any, paths: list[str]) -> bool:
    from ...inject import _name_matches

    if not patterns:
        return False
    patterns = patterns if isinstance(patterns, str) else list(patterns)
    return any(_name_matches(p, patterns) for p in paths)


def _plan_weight_tying(model: nn.Module, config: LoraConfig) -> tuple[str, str, list[str]] | None:
    """``ensure_weight_tying``, before anything is built: with the tied layers in ``modules_to_save`` or
    ``target_modules``, the config is rewritten as the ecosystem does (the input embedding named, the tied heads
    left out) and ``("modules_to_save" | "target_modules", embedding path, heads)`` says which heads
    :func:`_tie_heads` ties after.
    Without tied layers, or with none of them named, it warns and changes nothing.

    Raises:
        UnsupportedError: DoRA on tied embeddings (the magnitude has no tied form).
    """
    embed_path, heads = _tied_heads(model)
    tied = [embed_path, *heads] if embed_path is not None else []
    in_saved = bool(heads) and _names_any(config.modules_to_save, tied)
    in_targets = bool(heads) and not in_saved and _names_any(config.target_modules, tied)
    if not config.ensure_weight_tying:
        if in_saved or in_targets:
            warnings.warn(f"the output layer {heads} is tied to the input embedding '{embed_path}' and the adapter "
                          "adapts one of them, which then trains untied (merging or converting the model breaks the "
                          "tie); pass ensure_weight_tying=True to keep them tied", PeftWarning, stacklevel=5)
        return None
    if not heads:
        warnings.warn("ensure_weight_tying=True, but the model's output layer is not tied to its input embedding: "
                      "there is nothing to tie", PeftWarning, stacklevel=5)
        return None
    if not (in_saved or in_targets):
        warnings.warn("ensure_weight_tying=True, but no tied layer is in modules_to_save or target_modules: there is "
                      "nothing to tie", PeftWarning, stacklevel=5)
        return None
    if in_saved:
        kept = [m for m in config.modules_to_save if not _names_any([m], heads) or _names_any([m], [embed_path])]
        config.modules_to_save = kept if _names_any(kept, [embed_path]) else [*kept, embed_path]
        return "modules_to_save", embed_path, heads
    if config.use_dora:
        raise UnsupportedError("ensure_weight_tying=True with use_dora=True on tied embeddings: DoRA's magnitude has "
                               "no tied form; leave the embeddings out of target_modules or pass use_dora=False")
    if isinstance(config.target_modules, str):
        config.target_modules = rf"(?:{config.target_modules}|^{re.escape(embed_path)}$)"
    else:
        kept = [m for m in config.target_modules if not _names_any([m], heads) or _names_any([m], [embed_path])]
        config.target_modules = kept if _names_any(kept, [embed_path]) else [*kept, embed_path]
    return "target_modules", embed_path, heads


def _tie_heads(model: nn.Module, config: LoraConfig, adapter_name: str, plan: tuple[str, str, list[str]]) -> None:
    """The tied heads follow the input embedding's adapter: its ``modules_to_save`` copy's weight (one tensor), or
    its LoRA update, transposed (:class:`TiedLoraHead`)."""
    from ...inject import set_submodule

    how, embed_path, heads = plan
    source = model.get_submodule(embed_path)
    for path in heads:
        module = model.get_submodule(path)
        if how == "modules_to_save":
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module)
                set_submodule(model, path, module)
            module.add(adapter_name)
            module.modules_to_save[adapter_name].weight = source.modules_to_save[adapter_name].weight
            continue
        head = TiedLoraHead(source.adapters[adapter_name], source.base_layer, config.lora_dropout)
        if isinstance(module, AdaptedLayer) and adapter_name in module.adapters:  # a pattern matched it too
            module.replace(adapter_name, head)
            continue
        if not isinstance(module, AdaptedLayer):
            module = AdaptedLayer(module)
            set_submodule(model, path, module)
        module.add(adapter_name, head)


class _Transposed(nn.Module):
    """One factor of a tied head: the embedding adapter's parameter ``attr``, transposed, read as ``.weight``. Its
    state-dict entry is that view (the ecosystem's key ``<head>.lora_A.<name>.weight``); loading one changes nothing,
    since the embedding's own entry carries the values."""

    def __init__(self, source: nn.Module, attr: str) -> None:
        super().__init__()
        self.__dict__["_source"] = source  # not a submodule: the embedding's layer holds it
        self.attr = attr

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.__dict__["_source"], self.attr).t()

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        weight = self.weight
        destination[prefix + "weight"] = weight if keep_vars else weight.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        if prefix + "weight" not in state_dict and strict:
            missing_keys.append(prefix + "weight")


class TiedLoraHead(LayerAdapter):
    """LoRA on an output layer tied to the input embedding (``ensure_weight_tying``): the embedding's update,
    transposed, so the two stay one matrix. With the embedding's E + s·(B A)ᵀ the head computes
    x Eᵀ + s·(x B) A: in the ecosystem's terms ``lora_A = Bᵀ`` (r, dim) and ``lora_B = Aᵀ`` (vocab, r), which it
    shows (and saves) as views; its only parameters are the embedding adapter's. Merging writes nothing when the
    head's weight is the embedding's (the embedding's merge already changed it)."""

    def __init__(self, source: LoraEmbedding, embedding: nn.Module, dropout: float) -> None:
        super().__init__()
        self.__dict__["source"] = source  # neither is a submodule: the embedding's layer holds them
        self.__dict__["embedding"] = embedding
        self.lora_A = _Transposed(source, "lora_embedding_B")
        self.lora_B = _Transposed(source, "lora_embedding_A")
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def scaling(self) -> float:
        return self.__dict__["source"].scaling

    def delta_weight(self) -> torch.Tensor:
        """The head's (vocab, dim) update: the embedding's s·(B A)ᵀ itself."""
        return self.__dict__["source"].delta_weight()

    def forward(self, x: torch.Tensor, y: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        source = self.__dict__["source"]
        b, a = source.lora_embedding_B.to(y.dtype), source.lora_embedding_A.to(y.dtype)
        return y + ((self.lora_dropout(x).to(y.dtype) @ b) * self.scaling) @ a  # (..., vocab)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        pass  # the embedding's tensors carry the values (these are their transposes)

    def merge(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        if base_layer.weight is self.__dict__["embedding"].weight:
            return weight  # one tensor: the embedding's merge writes the update
        return weight.add_(self.delta_weight().to(weight.dtype))

    def unmerge(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        if base_layer.weight is self.__dict__["embedding"].weight:
            return weight
        return weight.sub_(self.delta_weight().to(weight.dtype))
