"""``graftkit.SFTTrainer``: TRL's ``SFTTrainer`` for graftkit models (needs ``pip install trl``).

Two ways in, as with HF peft: ``SFTTrainer(model=graftkit_model, ...)``, or ``SFTTrainer(model=base_or_path,
peft_config=graftkit.LoraConfig(...), ...)``. TRL's own features (its fused LM head, completion-only loss, packing,
padding-free batches) run unchanged: TRL patches its fused LM head onto the transformers model inside the graftkit
wrapper, as it does for HF peft models, and the wrapper passes TRL's extra forward arguments through.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ..config import PeftConfig
from ..errors import ConfigError, MissingPackageError, UnsupportedError
from ..layer import AdaptedLayer
from ..model import PeftModel, get_peft_model
from .trainer import AdapterTrainerMixin

try:
    import trl
    import trl.trainer.sft_trainer as _sft_module
except ImportError as exc:  # pragma: no cover - exercised only without TRL
    raise MissingPackageError("graftkit.SFTTrainer needs TRL: pip install trl") from exc


# TRL's function that puts its fused LM head on a model: its name in TRL 1.x up to 1.14, and from 1.15 on.
_FUSED_HEAD_PATCHERS = ("_patch_chunked_ce_lm_head", "add_fused_lm_head")


@contextlib.contextmanager
def _fused_head_inside_wrapper() -> Iterator[None]:
    """While TRL's constructor runs, its fused LM head goes onto the transformers model inside a graftkit wrapper
    (TRL unwraps only HF peft's class; on the wrapper its patched forward would find no backbone). A TRL without
    the fused head has none of the functions: nothing to redirect."""
    originals = {name: getattr(_sft_module, name) for name in _FUSED_HEAD_PATCHERS if hasattr(_sft_module, name)}

    def inside(original: Any) -> Any:
        def patch(model: Any, *args: Any, **kwargs: Any) -> Any:
            return original(model.get_base_model() if isinstance(model, PeftModel) else model, *args, **kwargs)
        return patch

    for name, original in originals.items():
        setattr(_sft_module, name, inside(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(_sft_module, name, original)


def _load_base(model: str, args: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = dict(getattr(args, "model_init_kwargs", None) or {})
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if isinstance(dtype, str) and dtype != "auto":
        kwargs["dtype" if "dtype" in kwargs else "torch_dtype"] = getattr(torch, dtype)
    return AutoModelForCausalLM.from_pretrained(model, **kwargs)


class SFTTrainer(AdapterTrainerMixin, trl.SFTTrainer):
    """``trl.SFTTrainer`` for graftkit models: adapter-only checkpoints, resume and ``load_best_model_at_end``
    as with HF peft, ``peft_config=`` taking a graftkit config. Other models train exactly as with TRL."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        args_list = list(args)
        model = args_list[0] if args_list else kwargs.get("model")
        peft_config = kwargs.get("peft_config")
        if isinstance(peft_config, PeftConfig):
            if isinstance(model, PeftModel):
                raise ConfigError(
                    "SFTTrainer got a graftkit model and a peft_config: pass one of them (add more adapters to the "
                    "model with add_adapter)"
                )
            training_args = args_list[1] if len(args_list) > 1 else kwargs.get("args")
            base = _load_base(model, training_args) if isinstance(model, str) else model
            model = get_peft_model(base, peft_config)
            del kwargs["peft_config"]
            if args_list:
                args_list[0] = model
            else:
                kwargs["model"] = model
        if isinstance(model, PeftModel) and isinstance(model.get_base_model().get_output_embeddings(), AdaptedLayer):
            raise UnsupportedError(
                "SFTTrainer computes log-probabilities from lm_head.weight directly, so an adapter on lm_head would "
                "never train: remove 'lm_head' from target_modules"
            )
        with _fused_head_inside_wrapper():
            super().__init__(*args_list, **kwargs)
