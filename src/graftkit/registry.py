"""The method registry: each method file registers itself; nothing else lists methods.

A *method* tells core three things: which config class it reads, how to build the adapter module that
sits on one base layer, and which extra base parameters (if any) it trains. Core does the rest:
matching targets, wrapping layers, trainability, save/load, merge.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from .errors import ConfigError, UnsupportedError

if TYPE_CHECKING:
    from .config import PeftConfig, TunerConfig


class Method:
    """Base class of a layer-wrapping method (LoRA, IA3, ...). Methods are stateless: class methods only.

    Attributes:
        peft_type: the ``peft_type`` string in ``adapter_config.json``.
        config_class: the dataclass that holds the method's fields.
        default_targets: ``model_type`` -> module names adapted when ``target_modules`` is ``None``.
    """

    peft_type: ClassVar[str]
    config_class: ClassVar[type[TunerConfig]]
    default_targets: ClassVar[dict[str, list[str]]] = {}

    @classmethod
    def attach(cls, model: nn.Module, config: PeftConfig, adapter_name: str) -> nn.Module | None:
        """Add adapter ``adapter_name`` to ``model``.

        Layer-wrapping methods (the default) wrap every targeted layer (see ``inject.py``) and return ``None``.
        Methods that act on the model's inputs instead (prompt methods) return a :class:`~graftkit.layer.ModelAdapter`
        that the model wrapper keeps and calls around the base model's forward and generate.
        """
        from .inject import inject

        inject(model, config, adapter_name)
        return None

    @classmethod
    def saves_embedding_layers(cls, config: PeftConfig) -> bool:
        """Whether ``save_embedding_layers="auto"`` also saves the base weights of the input/output embeddings:
        when the adapter targets them by name (``embed_tokens`` / ``lm_head``), as the ecosystem does."""
        targets = getattr(config, "target_modules", None)
        return targets is not None and any(name in targets for name in ("embed_tokens", "lm_head"))

    @classmethod
    def check_new_adapter(cls, config: PeftConfig, others: list[PeftConfig]) -> None:
        """Refuse an adapter that cannot live beside the model's other adapters ``others`` (raise a
        ``ConfigError``); most methods allow any."""

    @classmethod
    def module_targets(cls, model: nn.Module, config: TunerConfig) -> list[str]:
        """The module paths the adapter wraps (what :meth:`attach` injects into); most methods take
        ``target_modules`` (or its default for the architecture) as ``inject.py`` matches it."""
        from .inject import find_targets

        return find_targets(model, config)

    @classmethod
    def create_adapter(cls, base_layer: nn.Module, config: TunerConfig, module_name: str) -> nn.Module | None:
        """Build the adapter for one base layer, or ``None`` if this layer kind is not supported.

        The returned module is called as ``adapter(x, y, base_layer) -> y'`` (``y = base_layer(x)``), and
        offers ``merge(w, base_layer) -> w'`` / ``unmerge(w', base_layer) -> w`` on the dense base weight.
        """
        raise NotImplementedError

    @classmethod
    def adapter_shapes(cls, base_layer: nn.Module, config: TunerConfig, module_name: str) -> dict[str, tuple] | None:
        """The saved tensor names (relative to the layer) and shapes the adapter on ``base_layer`` would have,
        computed without allocating anything; loading checks a file against them before building adapters sized
        by the config. ``None``: not known (the check then runs after the adapters are built)."""
        return None

    @classmethod
    def supported_layers(cls) -> str:
        """Human-readable list of layer kinds, for error messages."""
        return "see the method's documentation"

    @classmethod
    def weighted_config(
        cls, configs: list[TunerConfig], combination_type: str | None, svd_rank: int | None, target_paths: list[str]
    ) -> tuple[str, TunerConfig]:
        """(the combination to run, the config of the combined adapter) for ``add_weighted_adapter``;
        ``combination_type=None`` asks for the method's default."""
        raise UnsupportedError(f"{cls.peft_type} adapters cannot be combined with add_weighted_adapter")

    @classmethod
    def combine_into(cls, target: nn.Module, sources: list[tuple[nn.Module | None, float]], combination_type: str,
                     **options: object) -> None:
        """Write the weighted combination of ``sources`` (adapter or None, weight) into ``target``, one layer."""
        raise UnsupportedError(f"{cls.peft_type} adapters cannot be combined with add_weighted_adapter")

    @classmethod
    def convert_from_initial(cls, config: PeftConfig, tensors: dict[str, torch.Tensor], initial_config: PeftConfig,
                             initial: dict[str, torch.Tensor], source: str) -> tuple[PeftConfig, dict]:
        """(config, tensors) of the adapter re-expressed for the original base model, given the adapter as it was
        before training (``save_pretrained(..., path_initial_model_for_weight_conversion=...)``)."""
        raise UnsupportedError(f"{cls.peft_type} adapters have no initial-weight conversion (it converts PiSSA and "
                               "OLoRA LoRA adapters)")

    @classmethod
    def upgrade_checkpoint(cls, model: nn.Module, config: PeftConfig, tensors: dict[str, torch.Tensor], source: str
                           ) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
        """(config, tensors) of a saved adapter re-expressed for ``model`` when its files were written for another
        layout of the same architecture (an older transformers); most methods return them unchanged."""
        return config, tensors

    @classmethod
    def training_state(cls, model: nn.Module, config: PeftConfig, adapter_name: str) -> dict[str, torch.Tensor]:
        """State the method keeps between optimizer steps outside the adapter's weights (AdaLoRA's importance
        averages), for a training checkpoint; most methods keep none."""
        return {}

    @classmethod
    def load_training_state(cls, model: nn.Module, config: PeftConfig, adapter_name: str,
                            tensors: dict[str, torch.Tensor]) -> None:
        """Take back what :meth:`training_state` gave (resuming a training run)."""

    @classmethod
    def restore_state(cls, model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        """Bring the adapter's modules in line with its config's ``training_state_fields`` (just taken from a
        checkpoint); most methods keep no such state."""

    @classmethod
    def regularization(cls, model: nn.Module, config: PeftConfig, adapter_name: str) -> torch.Tensor | None:
        """A term added to the model's loss in training mode (AdaLoRA's orthogonality penalty), or ``None``."""
        return None

    @classmethod
    def update_and_allocate(cls, model: nn.Module, config: PeftConfig, adapter_name: str, global_step: int) -> None:
        """Per-optimizer-step work of the method (AdaLoRA's rank allocation), called with the gradients still
        present; most methods have none."""

    @classmethod
    def extra_trainable(cls, model: nn.Module, config: TunerConfig) -> Iterator[tuple[str, nn.Parameter]]:
        """Base-model parameters (name, param) this method trains and saves besides its adapters."""
        return iter(())


_METHODS: dict[str, type[Method]] = {}
_LOADING = contextvars.ContextVar("graftkit_loading", default=False)


@contextlib.contextmanager
def loading() -> Iterator[None]:
    """Inside: adapters are being built to receive saved weights, so methods skip initialisations that need
    outside resources (a tokenizer for text-initialised prompts)."""
    token = _LOADING.set(True)
    try:
        yield
    finally:
        _LOADING.reset(token)


def is_loading() -> bool:
    return _LOADING.get()


def register(method: type[Method]) -> type[Method]:
    """Class decorator: make ``method`` known under its ``peft_type``."""
    _METHODS[method.peft_type] = method
    return method


def _ensure_loaded() -> None:
    from . import methods  # noqa: F401  (importing the package registers every method file)


def get_method(peft_type: str, *, source: str = "config") -> type[Method]:
    """The registered method for ``peft_type``.

    Raises:
        ConfigError: no method is registered under that name.
    """
    _ensure_loaded()
    key = str(getattr(peft_type, "value", peft_type))
    try:
        return _METHODS[key]
    except KeyError:
        raise ConfigError(
            f"{source}: peft_type={key!r} is not a method graftkit implements; known: {sorted(_METHODS)}"
        ) from None


def config_class(peft_type: str, *, source: str = "config") -> type[PeftConfig]:
    return get_method(peft_type, source=source).config_class


def method_for(config: PeftConfig) -> type[Method]:
    return get_method(str(config.peft_type), source=type(config).__name__)
