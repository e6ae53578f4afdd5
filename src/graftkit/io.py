"""Checkpoint files: atomic writes, safetensors read/write, and finding an adapter folder.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (tensor names as in the
ecosystem's format, see ``model.py``). Writes go to a temporary file in the same folder, are flushed to disk
and renamed over the old file, so a failed save leaves the previous checkpoint readable. Reads never
unpickle unless asked: ``adapter_model.bin`` is read only with ``allow_pickle=True``, and then with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import CONFIG_NAME
from .errors import CheckpointError

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    _atomic_write(path, write)


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights); give each its own.
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        ident = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if ident in seen or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()
        seen.add(ident)
        out[key] = tensor
    return out


def save_adapter_files(
    directory: str, config_json: str, tensors: dict[str, torch.Tensor], safe_serialization: bool = True
) -> None:
    """Write one adapter folder: weights first, then the config, each atomically.

    Raises:
        CheckpointError: ``directory`` exists as a file.
    """
    if os.path.isfile(directory):
        raise CheckpointError(f"cannot save the adapter to '{directory}': it is a file; pass a folder path")
    os.makedirs(directory, exist_ok=True)
    tensors = _unshare(tensors)
    if safe_serialization:
        _atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda tmp: save_file(tensors, tmp, {"format": "pt"}))
    else:
        _atomic_write(os.path.join(directory, PICKLE_WEIGHTS_NAME), lambda tmp: torch.save(tensors, tmp))
    atomic_write_text(os.path.join(directory, CONFIG_NAME), config_json)


def load_adapter_tensors(directory: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read the adapter tensors of a folder (to CPU).

    Raises:
        CheckpointError: no weights file, an unreadable file, or only a pickle file without ``allow_pickle``.
    """
    st_path = os.path.join(directory, WEIGHTS_NAME)
    bin_path = os.path.join(directory, PICKLE_WEIGHTS_NAME)
    if os.path.isfile(st_path):
        try:
            return load_file(st_path, device="cpu")
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{st_path}: not a readable safetensors file ({exc}); re-save the adapter") from None
    if os.path.isfile(bin_path):
        if not allow_pickle:
            raise CheckpointError(
                f"{directory} holds only {PICKLE_WEIGHTS_NAME}, a pickle file; graftkit does not unpickle by default. "
                "If you trust its origin, pass allow_pickle=True (it is read with torch.load(weights_only=True)), "
                "then re-save it as safetensors"
            )
        try:
            return torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for a bad pickle
            raise CheckpointError(f"{bin_path}: cannot be read with weights_only=True ({exc})") from None
    present = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    raise CheckpointError(
        f"{directory}: no {WEIGHTS_NAME} (or {PICKLE_WEIGHTS_NAME}); files there: {present[:20]}. "
        "Point to the folder that save_pretrained wrote"
    )


def resolve_adapter_file(
    model_id: str | os.PathLike[str],
    filename: str,
    subfolder: str | None = None,
    revision: str | None = None,
    **hub_kwargs: Any,
) -> str:
    """Path of ``filename`` in an adapter: a local folder, else a Hub repo id from the local HF cache
    (or downloaded, where the Hub is reachable).

    Raises:
        CheckpointError: neither a local file nor a cached/downloadable one.
    """
    model_id = os.fspath(model_id)
    local = os.path.join(model_id, subfolder or "", filename)
    if os.path.isdir(model_id):
        if os.path.isfile(local):
            return local
        present = sorted(os.listdir(os.path.join(model_id, subfolder or ""))) if os.path.isdir(
            os.path.join(model_id, subfolder or "")) else []
        raise CheckpointError(f"{local}: no such file (files there: {present[:20]}); is this an adapter folder?")
    from huggingface_hub import hf_hub_download

    kwargs = {k: v for k, v in hub_kwargs.items() if k in ("cache_dir", "token", "local_files_only", "force_download")}
    errors = []
    for local_only in (True, False):
        if local_only is False and (kwargs.get("local_files_only") or os.environ.get("HF_HUB_OFFLINE") == "1"):
            break
        try:
            return hf_hub_download(
                model_id, filename, subfolder=subfolder, revision=revision,
                **{**kwargs, "local_files_only": local_only or kwargs.get("local_files_only", False)},
            )
        except Exception as exc:  # hub errors have many types; we report them all the same way
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    raise CheckpointError(
        f"adapter '{model_id}': not a local folder, and '{filename}' is not in the Hugging Face cache "
        f"({'; '.join(errors)}). Pass the path of a folder written by save_pretrained"
    )


def resolve_adapter_dir(
    model_id: str | os.PathLike[str], subfolder: str | None = None, revision: str | None = None, **hub_kwargs: Any
) -> str:
    """The local folder of an adapter (its config's folder; the weights are fetched beside it when remote)."""
    config_path = resolve_adapter_file(model_id, CONFIG_NAME, subfolder, revision, **hub_kwargs)
    directory = os.path.dirname(config_path)
    if not os.path.isdir(os.fspath(model_id)):
        for name in (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME):
            try:
                resolve_adapter_file(model_id, name, subfolder, revision, **hub_kwargs)
                break
            except CheckpointError:
                continue
    return directory
