"""Trainable tokens: the embedding rows of a few token ids trained in full (LoRA's ``trainable_token_indices`` and
the standalone method share this layer kind)."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import ConfigError, TargetError, UnsupportedError
from ...layer import AdaptedLayer, LayerAdapter, Nest
from .config import LoraConfig
from .linear import _adapter_dtype


class TrainableTokens(LayerAdapter):
    """Trains the rows of a few token ids of an embedding (or of an output layer) in full.

    On an ``nn.Embedding`` the trained rows replace the looked-up vectors of those ids; on a linear output layer (a
    head tied to the input embedding) they replace the weight rows that give those ids' logits. A tied head shares
    the embedding adapter's rows (``shared``) and saves nothing of its own. Merging writes the rows into the weight;
    unmerging writes the original rows back.
    """

    def __init__(self, base_layer: nn.Module, indices: list[int], shared: TrainableTokens | None = None,
                 nested: bool = True, init: bool = True) -> None:
        """``nested``: LoRA's ``trainable_token_indices``, whose layers the ecosystem nests one level deeper
        (``<layer>.token_adapter``, a :class:`Nest`) and whose tied head saves nothing; otherwise the standalone
        method, whose tied head saves the shared rows too. ``init=False`` draws the rows from N(0, 1) (for tests)."""
        super().__init__()
        weight = base_layer.weight
        if not indices or min(indices) < 0 or max(indices) >= weight.shape[0]:
            bad = sorted(i for i in indices if not 0 <= i < weight.shape[0]) or "none"
            raise ConfigError(f"token indices {bad} are out of range for a {type(base_layer).__name__} of "
                              f"{weight.shape[0]} tokens (give at least one id in [0, {weight.shape[0]}))")
        self._shared = [shared] if shared is not None else []  # a list: not a submodule, nothing saved twice
        self.nested = nested
        self.register_buffer("indices", torch.tensor(indices, dtype=torch.long, device=weight.device),
                             persistent=False)
        self.register_buffer("original", weight.detach()[self.indices].clone(), persistent=False)  # (n, dim)
        if shared is None:
            rows = self.original.to(_adapter_dtype(weight)).clone()
            if not init:
                rows.normal_()
            self.trainable_tokens_delta = nn.Parameter(rows)  # (n, dim)
        else:
            self.trainable_tokens_delta = shared.trainable_tokens_delta  # the same tensor, as tied weights are
        self._slots: tuple | None = None

    def rows(self) -> torch.Tensor:
        return self.trainable_tokens_delta  # (n, dim)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.nested and self._shared else {"trainable_tokens_delta": self.rows()}

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for src in tensors.values():
                self.rows().copy_(src.to(device=self.rows().device, dtype=self.rows().dtype))

    def _slot(self, ids: torch.Tensor, vocab: int) -> torch.Tensor:
        """Each id's row among the trained ones, or -1."""
        if self._slots is None or self._slots[0] != (vocab, ids.device):
            table = torch.full((vocab,), -1, dtype=torch.long, device=ids.device)
            table[self.indices.to(ids.device)] = torch.arange(len(self.indices), device=ids.device)
            self._slots = ((vocab, ids.device), table)
        return self._slots[1][ids]

    def forward(self, x: torch.Tensor, y: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        rows = self.rows().to(y.dtype)
        if isinstance(base_layer, nn.Embedding):
            slot = self._slot(x, base_layer.num_embeddings)  # (...,)
            return torch.where((slot >= 0)[..., None], rows[slot.clamp(min=0)], y)
        logits = x @ rows.T  # (..., n): the trained rows' logits
        bias = getattr(base_layer, "bias", None)
        if bias is not None:
            logits = logits + bias[self.indices].to(y.dtype)
        return y.index_copy(y.dim() - 1, self.indices, logits)

    def merge(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return weight.index_copy_(0, self.indices, self.rows().detach().to(weight.dtype))

    def unmerge(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return weight.index_copy_(0, self.indices, self.original.to(weight.dtype))


def add_trainable_tokens(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    """Wrap the layers ``trainable_token_indices`` names (a list: the input embedding) with :class:`TrainableTokens`;
    an output layer tied to a wrapped embedding shares its rows, as the tied weights are one tensor."""
    from ...inject import _name_matches, iter_modules

    tokens = config.trainable_token_indices
    if tokens is None:
        return
    paths = {path: module for path, module in iter_modules(model) if path}
    if isinstance(tokens, dict):
        wanted = []
        for name, ids in tokens.items():
            found = [p for p in paths if _name_matches(p, [name])]
            if not found:
                raise TargetError(f"trainable_token_indices names '{name}', which matches no module of "
                                  f"{type(model).__name__}")
            wanted += [(p, ids) for p in found]
    else:
        wanted = [(input_embedding_path(model, "trainable_token_indices={'embed_tokens': [...]}"), tokens)]
    wrap_token_rows(model, wanted, adapter_name, nested=True, init=True)


def _base_of(module: nn.Module) -> nn.Module:
    module = module.inner if isinstance(module, Nest) else module
    return module.base_layer if isinstance(module, AdaptedLayer) else module


def input_embedding_path(model: nn.Module, hint: str) -> str:
    """The module path of ``model``'s input embedding (wrapped or not).

    Raises:
        TargetError: the model has none it can name; ``hint`` says how to name the layer instead.
    """
    from ...inject import iter_modules

    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    found = [p for p, m in iter_modules(model) if p and embedding is not None and (m is embedding
                                                                                   or _base_of(m) is embedding)]
    if not found:
        raise TargetError(f"{type(model).__name__} has no input embedding to find; name the layer: {hint}")
    return found[0]


def wrap_token_rows(model: nn.Module, wanted: list[tuple[str, list[int]]], adapter_name: str, nested: bool,
                    init: bool) -> None:
    """Give each module path in ``wanted`` a :class:`TrainableTokens` adapter for its token ids; an output layer
    tied to a wrapped embedding (one weight tensor) gets an adapter sharing those rows.

    Raises:
        TargetError: a path is not an embedding or linear output layer. UnsupportedError: it already holds
        ``adapter_name`` (e.g. as a LoRA target).
    """
    from ...inject import iter_modules

    created: dict[int, TrainableTokens] = {}
    for path, ids in wanted:
        module = model.get_submodule(path)
        base = _base_of(module)
        if not isinstance(base, (nn.Embedding, nn.Linear)):
            raise TargetError(f"trainable tokens: '{path}' is a {type(base).__name__}, not an embedding or linear "
                              "output layer")
        module = _token_layer(model, path, nested)
        if adapter_name in module.adapters:
            raise UnsupportedError(f"'{path}' is both a LoRA target and in trainable_token_indices; pick one")
        adapter = TrainableTokens(base, list(ids), nested=nested, init=init)
        module.add(adapter_name, adapter)
        created[id(base.weight)] = adapter
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = _base_of(head) if head is not None else None
    if head is not None and id(getattr(head, "weight", None)) in created and \
            not any(_base_of(model.get_submodule(p)) is head for p, _ in wanted):
        path = next(p for p, m in iter_modules(model) if p and (m is head or _base_of(m) is head))
        shared = created[id(head.weight)]
        adapter = TrainableTokens(head, shared.indices.tolist(), shared=shared, nested=nested)
        _token_layer(model, path, nested).add(adapter_name, adapter)


def _token_layer(model: nn.Module, path: str, nested: bool) -> AdaptedLayer:
    """The adapted layer trainable tokens join at ``path``: the one there (also inside a :class:`Nest`), or a new
    one (nested: inside a new ``Nest`` as ``token_adapter``, the ecosystem's layout for LoRA's tokens)."""
    from ...inject import set_submodule

    module = model.get_submodule(path)
    if isinstance(module, Nest):
        return module.inner
    if isinstance(module, AdaptedLayer):
        return module
    layer = AdaptedLayer(module)
    layer.train(module.training)
    set_submodule(model, path, Nest("token_adapter", layer) if nested else layer)
    return layer
