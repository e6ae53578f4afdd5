"""``graftkit.Trainer`` and ``graftkit.SFTTrainer``: transformers' and TRL's trainers for graftkit models.

transformers' ``Trainer`` and TRL's ``SFTTrainer`` recognise adapter models by ``isinstance(model,
peft.PeftModel)``, with no public extension point. For any other model they write the full ``state_dict`` as a
checkpoint (which fails on tied embeddings), resume only full models, refuse quantized bases, pick label smoothing's
label shift from the wrapper's class name, and (TRL) patch their fused LM head onto the wrapper instead of the
transformers model inside it. :class:`AdapterTrainerMixin` changes exactly those decisions for graftkit models and
nothing else; any other model goes through the parent class untouched.

Checkpoint layout (the one HF peft + Trainer writes, so either library can read it)::

    checkpoint-500/
      adapter_config.json, adapter_model.safetensors      the "default" adapter
      <name>/adapter_config.json, ...                     every other adapter
      optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json, training_args.bin

**A checkpoint is complete or absent.** Each one is written under ``.graftkit-staging/checkpoint-N`` in the run
folder and renamed into place once every file is there, so a process killed mid-save (or a full disk) leaves no
``checkpoint-N`` behind, only staging that the next save removes. Resuming (``resume_from_checkpoint=True``)
takes the newest complete checkpoint and says which incomplete ones it skipped (folders written by other tools
may still be partial); a path to an incomplete one is an error naming what is missing.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import sys
import traceback
from collections.abc import Iterator
from typing import Any

import torch
import transformers
from torch import nn

from ..errors import CheckpointError, GraftkitError, SaveError, UnsupportedError
from ..model import PeftModel
from ..weights import is_quantized

TRAINING_ARGS_NAME = "training_args.bin"
TRAINING_STATE_NAME = "graftkit_training_state.safetensors"  # methods' state between steps (AdaLoRA)
STAGING_DIR = ".graftkit-staging"  # in the run folder: checkpoints being written (never matched by checkpoint-*)
_logger = transformers.utils.logging.get_logger("graftkit")


def _graftkit_model(trainer: Any, model: nn.Module | None = None) -> PeftModel | None:
    """The graftkit model a trainer trains (unwrapped from DDP and the like), or ``None``."""
    model = trainer.model if model is None else model
    with contextlib.suppress(AttributeError):
        model = trainer.accelerator.unwrap_model(model)
    return model if isinstance(model, PeftModel) else None


def _quantized(model: PeftModel) -> bool:
    base = model.get_base_model()
    return bool(getattr(base, "is_quantized", False)) or any(is_quantized(m) for m in base.modules())


@contextlib.contextmanager
def _adapters_attached(model: nn.Module) -> Iterator[None]:
    """During the parent constructor, present a graftkit model on a quantized base as what it is for transformers'
    check: not a purely quantized model, since it carries adapters (checked by :func:`_check_trains_something`)."""
    if not isinstance(model, PeftModel) or not _quantized(model):
        yield
        return
    model.is_quantized = False  # an instance attribute over the base model's, removed below
    try:
        yield
    finally:
        del model.is_quantized


def _check_trains_something(model: PeftModel) -> None:
    if _quantized(model) and not any(p.requires_grad for p in model.parameters()):
        raise GraftkitError(
            "the model has a quantized base and no trainable adapter: nothing would train. Make an adapter "
            "trainable (set_adapter(name), or PeftModel.from_pretrained(..., is_trainable=True))"
        )


class _AdapterStepCallback(transformers.TrainerCallback):
    """Calls the model's ``update_and_allocate`` after every optimizer step, while the gradients are still there
    (AdaLoRA's rank allocation; HF peft leaves that call to the user)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = _graftkit_model(self.trainer)
        if model is not None:
            model.update_and_allocate(state.global_step)  # the step being taken, counted from 0


class AdapterTrainerMixin:
    """Saving, resuming, best-model loading, the quantization check and the loss set-up, for graftkit models.

    Put it before the trainer class: ``class MyTrainer(AdapterTrainerMixin, transformers.Trainer)``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        model = kwargs.get("model", args[0] if args else None)
        if isinstance(model, PeftModel):
            _check_trains_something(model)
        with _adapters_attached(model):
            super().__init__(*args, **kwargs)
        if _graftkit_model(self) is not None:
            self._look_through_wrapper()
            self.add_callback(_AdapterStepCallback(self))

    # ------------------------------------------------------------------ what transformers reads off the model class
    def _look_through_wrapper(self) -> None:
        """Read label names, loss arguments and label smoothing's shift from the transformers model inside, as
        transformers does for HF peft's wrapper."""
        from transformers.utils import can_return_loss, find_labels

        base = _graftkit_model(self).get_base_model()
        if self.args.label_names is None:
            self.label_names = find_labels(type(base))
        self.can_return_loss = can_return_loss(type(base))
        if hasattr(base, "accepts_loss_kwargs"):
            self.model_accepts_loss_kwargs = base.accepts_loss_kwargs
        else:
            params = inspect.signature(base.forward).parameters.values()
            self.model_accepts_loss_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)
        if getattr(self, "label_smoother", None) is not None and getattr(self, "compute_loss_func", None) is None:
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

            shift = base._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
            smoother = self.label_smoother

            model = _graftkit_model(self)
            # transformers 5.6 (the floor) has no num_items_in_batch on the smoother (5.16 has): it averages per batch
            counts_items = "num_items_in_batch" in inspect.signature(smoother.__call__).parameters

            def smoothed_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
                extra = {"num_items_in_batch": num_items_in_batch} if counts_items else {}
                loss = smoother(outputs, labels, shift_labels=shift, **extra)
                penalty = model.training_penalty() if model.training else None  # AdaLoRA's, as forward adds it
                return loss if penalty is None else loss + penalty

            self.compute_loss_func = smoothed_loss

    def _set_signature_columns_if_needed(self) -> None:
        parent = super()._set_signature_columns_if_needed
        model = _graftkit_model(self)
        # Only where transformers would read the wrapper's forward; a subclass's own choice (TRL's) stands.
        own = getattr(parent, "__func__", None) is transformers.Trainer._set_signature_columns_if_needed
        if model is None or self._signature_columns is not None or not own:
            return parent()
        columns = list(inspect.signature(model.get_base_model().forward).parameters)
        self._signature_columns = columns + sorted({"label", "label_ids", *self.label_names})

    # ------------------------------------------------------------------ checkpoints
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = _graftkit_model(self)
        if model is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # Every rank calls save_pretrained: sharded (FSDP2) adapter tensors are gathered collectively, then the
        # main process writes. transformers calls _save on the main process only, except for sharded models.
        model.save_pretrained(output_dir, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return
        state = model.training_state()  # a method's state between steps (AdaLoRA's importance averages)
        if state:
            from safetensors.torch import save_file

            path = os.path.join(output_dir, TRAINING_STATE_NAME)
            partial = f"{path}.partial"  # written whole, then renamed: a reader sees the old file or the new one
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, partial)
            os.replace(partial, path)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """transformers' checkpoint, written in a staging folder and renamed into place when complete."""
        if _graftkit_model(self) is None or self.args.push_to_hub:  # the Hub upload reads the final folder
            return super()._save_checkpoint(model, trial)
        run_dir = self._get_output_dir(trial=trial)
        staging = os.path.join(run_dir, STAGING_DIR)
        name = f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final = os.path.join(run_dir, name)
        if self.args.should_save:
            _clear_staging(staging, run_dir)  # what a killed save left
        self._barrier()
        self._get_output_dir = lambda trial=None: staging  # type: ignore[method-assign]  # where super() writes
        try:
            super()._save_checkpoint(model, trial)
            best = self.state.best_model_checkpoint
            if best is not None and os.path.dirname(best) == staging:  # the path it will have
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
                if self.args.should_save:
                    self.state.save_to_json(os.path.join(staging, name, transformers.trainer.TRAINER_STATE_NAME))
            self._barrier()  # every rank's files (sharded optimizer states) are in before the rename
            if self.args.should_save:
                _fsync_tree(os.path.join(staging, name))
                if os.path.exists(final):  # the same step saved again (a resumed run): replace it whole
                    os.replace(final, os.path.join(staging, f"replaced-{name}"))
                os.replace(os.path.join(staging, name), final)
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException as exc:
            if self.args.should_save:
                replaced = os.path.join(staging, f"replaced-{name}")
                if os.path.isdir(replaced) and not os.path.exists(final):
                    os.replace(replaced, final)  # the old copy of this step goes back
                shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, SaveError):
                raise
            if _write_failure(exc):
                raise SaveError(f"cannot write {name} in {run_dir}: {str(exc).strip()[:200]}. The run's earlier "
                                "checkpoints are unchanged; free disk space and resume from the last one") from exc
            raise
        finally:
            del self._get_output_dir
        self._barrier()
        if self.args.should_save:
            _rotate(run_dir, staging, self.args.save_total_limit, self.state.best_model_checkpoint)

    def _barrier(self) -> None:
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``train``; for a graftkit model, ``resume_from_checkpoint=True`` takes the newest
        *complete* checkpoint of ``output_dir`` (skipped ones are named in the log), and a path to an incomplete
        one is a :class:`CheckpointError`."""
        model = _graftkit_model(self)
        if model is not None and resume_from_checkpoint not in (None, False):
            optimizer = not (self.args.save_only_model or self.is_deepspeed_enabled or self.is_fsdp_enabled)
            adapters = list(model.peft_config)
            if resume_from_checkpoint is True:
                resume_from_checkpoint = newest_complete_checkpoint(self.args.output_dir, adapters, optimizer,
                                                                    log=_logger.warning)
            else:
                problem = checkpoint_problem(os.fspath(resume_from_checkpoint), adapters, optimizer)
                if problem is not None:
                    raise CheckpointError(f"cannot resume from {resume_from_checkpoint}: {problem}. Resume from an "
                                          "earlier checkpoint, or with resume_from_checkpoint=True for the newest "
                                          "complete one")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        graftkit_model = _graftkit_model(self, model)
        if graftkit_model is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapters_from(graftkit_model, resume_from_checkpoint)
        state_file = os.path.join(resume_from_checkpoint, TRAINING_STATE_NAME)
        if os.path.isfile(state_file):
            from safetensors.torch import load_file

            graftkit_model.load_training_state(load_file(state_file))

    def _load_best_model(self) -> None:
        model = _graftkit_model(self)
        if model is None:
            return super()._load_best_model()
        load_adapters_from(model, self.state.best_model_checkpoint)


def load_adapters_from(model: PeftModel, checkpoint: str) -> None:
    """Load every adapter of ``model`` from a checkpoint folder written by ``save_pretrained`` (``default`` at the
    top, others in sub-folders), in place: weights replaced, activation and trainability kept.

    Raises:
        CheckpointError: the folder lacks one of the model's adapters (nothing is loaded then).
    """
    folders = {name: checkpoint if name == "default" else os.path.join(checkpoint, name) for name in model.peft_config}
    missing = [name for name, folder in folders.items()
               if not os.path.isfile(os.path.join(folder, "adapter_config.json"))]
    if missing:
        present = sorted(os.listdir(checkpoint)) if os.path.isdir(checkpoint) else []
        raise CheckpointError(
            f"{checkpoint}: no saved adapter for {missing} (files there: {present[:20]}). Resume from a checkpoint "
            "that graftkit.Trainer wrote for this model, with the same adapters"
        )
    for name, folder in folders.items():
        model.load_adapter(folder, adapter_name=name)


def _rotate(run_dir: str, staging: str, limit: int | None, best: str | None) -> None:
    """Keep the newest ``limit`` checkpoints (and the best one), as transformers' ``save_total_limit`` does, but
    each one dropped is first moved into the staging folder, then deleted there: a run killed while deleting
    leaves no half-deleted checkpoint among the complete ones (the next save clears the staging folder)."""
    if limit is None or limit <= 0:
        return
    checkpoints = transformers.trainer_utils.sort_checkpoints(
        run_dir, transformers.trainer_utils.PREFIX_CHECKPOINT_DIR, use_mtime=True)
    protected = {os.path.normpath(checkpoints[-1])} if checkpoints else set()
    if best is not None:
        protected.add(os.path.normpath(best))
    keep, remaining = max(limit, len(protected)), len(checkpoints)
    for checkpoint in checkpoints:
        if remaining <= keep:
            break
        if os.path.normpath(checkpoint) in protected:
            continue
        os.makedirs(staging, exist_ok=True)
        doomed = os.path.join(staging, f"deleted-{os.path.basename(checkpoint)}")
        os.replace(checkpoint, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        remaining -= 1
    shutil.rmtree(staging, ignore_errors=True)


def _clear_staging(staging: str, run_dir: str) -> None:
    """Remove what a killed checkpoint save left in ``staging``; a checkpoint it had moved aside to replace
    (killed between the two renames) goes back first."""
    if os.path.isdir(staging):
        for entry in os.listdir(staging):
            final = os.path.join(run_dir, entry.removeprefix("replaced-"))
            if entry.startswith("replaced-") and not os.path.exists(final):
                os.replace(os.path.join(staging, entry), final)
    shutil.rmtree(staging, ignore_errors=True)


def _write_failure(exc: BaseException) -> bool:
    """Whether a checkpoint write failed for the disk's sake (full, a file-size limit, permissions): an
    ``OSError``, safetensors' error, or a ``RuntimeError`` out of ``torch.save`` (whose file writer reports a short
    write as "iostream error" or "unexpected pos")."""
    from safetensors import SafetensorError

    if isinstance(exc, (OSError, SafetensorError)):
        return True
    if isinstance(exc, RuntimeError):
        frames = traceback.extract_tb(exc.__traceback__)
        return any(frame.filename.endswith(os.path.join("torch", "serialization.py")) for frame in frames)
    return False


def _fsync_tree(folder: str) -> None:
    """Flush every file of a finished checkpoint to disk before it is renamed into place."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())


def checkpoint_problem(folder: str, adapters: list[str] = ("default",), optimizer: bool = True) -> str | None:
    """Why a Trainer checkpoint folder cannot be resumed from (a save cut short, files deleted), or ``None``.

    Args:
        adapters: the adapters it must hold (``default`` at the top, others in sub-folders).
        optimizer: it must hold ``optimizer.pt`` and ``scheduler.pt`` too (resuming without them would restart the
            optimizer silently).
    """
    if not os.path.isdir(folder):
        return "it is not a folder"
    try:
        with open(os.path.join(folder, transformers.trainer.TRAINER_STATE_NAME), encoding="utf-8") as fh:
            state = json.load(fh)
        if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
            return "its trainer_state.json is damaged"
    except FileNotFoundError:
        return "it has no trainer_state.json (its save was cut short)"
    except (OSError, ValueError, RecursionError):
        return "its trainer_state.json is damaged (its save was cut short?)"
    from ..io import JOURNAL_NAME, PICKLE_WEIGHTS_NAME, WEIGHTS_NAME

    for name in adapters:
        sub = folder if name == "default" else os.path.join(folder, name)
        have = set(os.listdir(sub)) if os.path.isdir(sub) else set()
        if JOURNAL_NAME not in have and ("adapter_config.json" not in have
                                         or not have & {WEIGHTS_NAME, PICKLE_WEIGHTS_NAME}):
            return f"it has no complete adapter '{name}' ({os.path.relpath(sub, folder)})"
    if optimizer:
        missing = [f for f in (transformers.trainer.OPTIMIZER_NAME, transformers.trainer.SCHEDULER_NAME)
                   if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            return f"it has no {' or '.join(missing)}"
    return None


def checkpoints_of(run_dir: str) -> list[str]:
    """The ``checkpoint-N`` folders of a run folder, oldest step first."""
    prefix = f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-"
    if not os.path.isdir(run_dir):
        return []
    steps = [d for d in os.listdir(run_dir) if d.startswith(prefix) and d[len(prefix):].isdigit()
             and os.path.isdir(os.path.join(run_dir, d))]
    return [os.path.join(run_dir, d) for d in sorted(steps, key=lambda d: int(d[len(prefix):]))]


def newest_complete_checkpoint(run_dir: str, adapters: list[str] = ("default",), optimizer: bool = True,
                               log: Any = None) -> str:
    """The newest checkpoint of ``run_dir`` that :func:`checkpoint_problem` finds complete; ``log`` is told of
    every newer one skipped, and why.

    Raises:
        CheckpointError: no complete checkpoint (the incomplete ones are named).
    """
    skipped = []
    for folder in reversed(checkpoints_of(run_dir)):
        problem = checkpoint_problem(folder, adapters, optimizer)
        if problem is None:
            if skipped and log is not None:
                log(f"resuming from {os.path.basename(folder)}, the newest complete checkpoint; skipped "
                    + "; ".join(f"{os.path.basename(f)} ({p})" for f, p in skipped))
            return folder
        skipped.append((folder, problem))
    if skipped:
        raise CheckpointError(f"no complete checkpoint to resume from in {run_dir}: "
                              + "; ".join(f"{os.path.basename(f)}: {p}" for f, p in skipped))
    raise CheckpointError(f"no checkpoint-N folder to resume from in {run_dir}; start the run without resuming")


class Trainer(AdapterTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` for graftkit models: adapter-only checkpoints (the files HF peft writes), resume,
    ``load_best_model_at_end``, QLoRA and label smoothing work as they do for HF peft models. Any other model is
    trained exactly as by ``transformers.Trainer``."""


# ---------------------------------------------------------------------------------------------- plain trainers
def refuse_plain_trainer_checkpoint(frame_depth: int = 2) -> None:
    """Called from ``PeftModel.state_dict``: if the caller is the plain ``transformers.Trainer._save`` (which
    would write the full model, or crash on tied weights), raise a clear error instead."""
    frame = sys._getframe(frame_depth)
    if frame.f_code.co_name == "_save" and frame.f_globals.get("__name__") == "transformers.trainer":
        trainer = frame.f_locals.get("self")
        if not isinstance(trainer, AdapterTrainerMixin):
            raise UnsupportedError(
                f"{type(trainer).__name__} cannot checkpoint a graftkit model: transformers saves adapters only for "
                "HF peft's class and would write the full model. Use graftkit.Trainer (or graftkit.SFTTrainer), "
                "a drop-in subclass: `from graftkit import Trainer`"
            )


def check_plain_trainer_training(model: PeftModel, frame_depth: int = 2) -> None:
    """Called from ``PeftModel.train()``: a plain transformers/TRL trainer starting a training step gets a clear
    message naming graftkit's trainer (TRL's patched forward cannot run on a graftkit model at all)."""
    frame = sys._getframe(frame_depth)
    if frame.f_globals.get("__name__") != "transformers.trainer":
        return
    trainer = frame.f_locals.get("self")
    if not isinstance(trainer, transformers.Trainer) or isinstance(trainer, AdapterTrainerMixin):
        return
    if type(trainer).__module__.startswith("trl."):
        raise UnsupportedError(
            f"trl.{type(trainer).__name__} cannot train a graftkit model (it unwraps only HF peft's class). Use "
            "graftkit.SFTTrainer, a drop-in subclass: `from graftkit import SFTTrainer`"
        )
    if not model.__dict__.get("_plain_trainer_warned"):
        model.__dict__["_plain_trainer_warned"] = True
        import warnings

        warnings.warn(
            "transformers.Trainer is training a graftkit model: it will not save adapter checkpoints or resume them "
            "(its first checkpoint stops with an error). Use graftkit.Trainer, a drop-in subclass: "
            "`from graftkit import Trainer`",
            UserWarning,
            stacklevel=frame_depth + 1,
        )
