"""Checkpoint files: whole-checkpoint atomic saves, checked reads, and finding an adapter folder.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (tensor names as in the
ecosystem's format, see ``model.py``).

**A save is one unit.** Every file of the new checkpoint is first written into a staging folder inside the
adapter folder (``.graftkit-<id>.tmp/``) and flushed to disk. Then a small journal (``.graftkit-save.json``)
naming the staging folder is renamed into place: that rename is the commit point. The staged files are then
renamed over the old ones, the other format's stale weights file is removed, and the journal and staging
folder are deleted. A save killed before the commit point leaves the old checkpoint untouched (its staging
folder is removed by the next save); one killed after it is finished by the next load or save, which replays
the journal. A reader that finds a journal it cannot replay (a read-only folder) reads the files the journal
names. Either way graftkit sees the old pair or the new pair.

**The pair is recorded.** The safetensors metadata (which HF peft and vLLM ignore) holds the config the
weights were saved with (``graftkit.adapter_config``: the fields that decide what the adapter computes).
Loading compares it with ``adapter_config.json`` and refuses a mix of two saves, whatever produced it.

**Reads are checked.** Only regular files are opened (a FIFO would block), safetensors headers are parsed by
the safetensors library behind one error type, tensors must be floating point, and NaN/Inf values are named
in a warning. ``adapter_model.bin`` is read only with ``allow_pickle=True``, and then with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import CONFIG_NAME, PeftConfig, check_regular_file, read_regular_file
from .errors import CheckpointError, SaveError

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
JOURNAL_NAME = ".graftkit-save.json"
TMP_PREFIX = ".graftkit-"
RECORD_KEY = "graftkit.adapter_config"  # safetensors metadata key: the config the weights were saved with
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CHECKPOINT_FILES = (CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME)


# ---------------------------------------------------------------------------------------------- writing
def _fsync_path(path: str) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(directory: str) -> None:
    try:  # makes the renames durable; not every platform/filesystem allows opening a folder
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def _read_journal(directory: str) -> dict[str, Any] | None:
    """The pending save's journal, or ``None``.

    Raises:
        CheckpointError: a journal exists but is not one graftkit wrote.
    """
    path = os.path.join(directory, JOURNAL_NAME)
    if not os.path.lexists(path):
        return None
    try:
        journal = json.loads(read_regular_file(path, "the save journal", CheckpointError).decode("utf-8"))
        stage, names, remove = journal["stage"], journal["files"], journal["remove"]
        valid = (isinstance(stage, str) and stage.startswith(TMP_PREFIX) and stage.endswith(".tmp")
                 and os.sep not in stage and isinstance(names, list) and isinstance(remove, list)
                 and all(n in _CHECKPOINT_FILES for n in names + remove))
    except (ValueError, KeyError, TypeError, RecursionError):
        valid = False
    if not valid:
        raise CheckpointError(
            f"{path}: the record of an interrupted save is damaged, so graftkit cannot tell which files belong "
            "together. Delete it if the folder's adapter files are the ones you want, or save the adapter again"
        )
    return journal


def _replay(directory: str, journal: dict[str, Any]) -> None:
    """Finish a committed save (idempotent: a second replay, or a concurrent one, changes nothing)."""
    stage = os.path.join(directory, journal["stage"])
    for name in journal["files"]:
        try:
            os.replace(os.path.join(stage, name), os.path.join(directory, name))
        except FileNotFoundError:  # moved already
            pass
    for name in journal["remove"]:
        try:
            os.remove(os.path.join(directory, name))
        except FileNotFoundError:
            pass
    _fsync_dir(directory)
    try:
        os.remove(os.path.join(directory, JOURNAL_NAME))
    except FileNotFoundError:
        pass
    _fsync_dir(directory)
    shutil.rmtree(stage, ignore_errors=True)


def recover(directory: str) -> None:
    """Finish the committed save an earlier process was killed in (if any), and remove what saves killed before
    their commit point left behind. Raises ``OSError`` when the folder cannot be written."""
    journal = _read_journal(directory)
    if journal is not None:
        _replay(directory, journal)
    for entry in os.listdir(directory):
        if entry.startswith(TMP_PREFIX) and entry.endswith(".tmp"):
            path = os.path.join(directory, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)


def save_checkpoint(directory: str, files: dict[str, Callable[[str], None]], stale: list[str] = ()) -> None:
    """Write one checkpoint folder as a unit: ``files`` maps each file name to a writer ``write(path)``; the
    names in ``stale`` are removed in the same step (the other format's weights).

    The writers write into a staging folder inside ``directory`` (so their own temporary files, if any, stay
    there); a journal naming the staged files is the commit point. Files get the mode the umask gives ordinary
    files. A failure before the commit point removes the staging folder and leaves the old checkpoint as it was.

    Raises:
        SaveError: the folder cannot be created or written (the message says why); the old checkpoint is intact.
        CheckpointError: ``directory`` is a file, or holds a damaged journal.
    """
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError(f"cannot save the adapter to '{directory}': it is a file; pass a folder path")
    token = secrets.token_hex(6)
    stage_name = f"{TMP_PREFIX}{token}.tmp"
    stage = os.path.join(directory, stage_name)
    try:
        os.makedirs(directory, exist_ok=True)
        recover(directory)
        os.mkdir(stage)
    except OSError as exc:
        raise SaveError(f"cannot save the adapter to '{directory}': {exc.strerror or exc}. Check that the folder is "
                        "writable and the disk has room; its previous checkpoint (if any) is unchanged") from exc
    mode = 0o666 & ~_umask()
    journal_tmp = os.path.join(directory, f"{TMP_PREFIX}{token}.journal.tmp")
    try:
        for name, write in files.items():
            path = os.path.join(stage, name)
            write(path)
            os.chmod(path, mode)  # some writers (safetensors) create private files; ours follow the umask
            _fsync_path(path)
        _fsync_dir(stage)
        with open(journal_tmp, "w", encoding="utf-8") as fh:
            json.dump({"stage": stage_name, "files": list(files), "remove": [n for n in stale if n not in files]}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(journal_tmp, os.path.join(directory, JOURNAL_NAME))  # the commit point
    except BaseException as exc:
        if _committed(directory, stage_name):  # interrupted right at the commit point: the next load finishes it
            raise
        shutil.rmtree(stage, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.remove(journal_tmp)
        if isinstance(exc, OSError):
            raise SaveError(f"cannot save the adapter to '{directory}': {exc.strerror or exc}. The previous "
                            "checkpoint there is unchanged") from exc
        raise
    try:
        _replay(directory, _read_journal(directory))
    except OSError as exc:
        raise SaveError(f"the adapter save to '{directory}' was committed but not finished ({exc.strerror or exc}); "
                        "the next load or save of that folder finishes it") from exc


def _committed(directory: str, stage_name: str) -> bool:
    """Whether the journal in ``directory`` is the one of the save staged in ``stage_name``."""
    try:
        journal = _read_journal(directory)
    except CheckpointError:
        return False
    return journal is not None and journal["stage"] == stage_name


def text_writer(text: str) -> Callable[[str], None]:
    """A writer for :func:`save_checkpoint` that writes ``text`` (UTF-8)."""

    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)

    return write


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


def save_adapter_files(directory: str, config: PeftConfig, tensors: dict[str, torch.Tensor],
                       safe_serialization: bool = True) -> None:
    """Write one adapter folder (config + weights) as one unit, removing the other format's weights file.

    Raises:
        SaveError / CheckpointError: see :func:`save_checkpoint`.
    """
    tensors = _unshare(tensors)
    config_json = config.to_json_string()
    if safe_serialization:
        metadata = {"format": "pt", RECORD_KEY: json.dumps(config.semantic_dict(), sort_keys=True)}
        weights, stale = (WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata)), PICKLE_WEIGHTS_NAME
    else:
        weights, stale = (PICKLE_WEIGHTS_NAME, lambda tmp: torch.save(tensors, tmp)), WEIGHTS_NAME

    save_checkpoint(directory, {weights[0]: weights[1], CONFIG_NAME: text_writer(config_json)}, stale=[stale])


# ---------------------------------------------------------------------------------------------- reading
def checkpoint_paths(directory: str) -> dict[str, str | None]:
    """Where each checkpoint file of ``directory`` is (``None``: not part of the checkpoint). A committed but
    unfinished save is finished first or, in a folder graftkit cannot write, read from the files its journal
    names."""
    paths: dict[str, str | None] = {name: os.path.join(directory, name) for name in _CHECKPOINT_FILES}
    journal = _read_journal(directory)
    if journal is None:
        return paths
    try:
        _replay(directory, journal)
        return paths
    except OSError:  # read-only: read the new files where they are
        for name in journal["files"]:
            staged = os.path.join(directory, journal["stage"], name)
            if os.path.exists(staged):
                paths[name] = staged
        for name in journal["remove"]:
            paths[name] = None  # removed by the committed save
        return paths


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    check_regular_file(path, "the weights file", CheckpointError)
    try:
        with safe_open(path, "pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            return {key: fh.get_tensor(key) for key in fh.keys()}, metadata
    except BaseException as exc:  # safetensors raises SafetensorError, and a Rust panic for some headers
        if isinstance(exc, (KeyboardInterrupt, SystemExit, MemoryError)):
            raise
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(exc)[:200]}); re-save the adapter") \
            from None


def _read_pickle(path: str) -> dict[str, torch.Tensor]:
    check_regular_file(path, "the weights file", CheckpointError)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except BaseException as exc:  # torch raises many types for a bad pickle
        if isinstance(exc, (KeyboardInterrupt, SystemExit, MemoryError)):
            raise
        raise CheckpointError(f"{path}: cannot be read with weights_only=True ({str(exc)[:200]})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in data.items()):
        raise CheckpointError(f"{path}: expected a mapping of tensor names to tensors, got {type(data).__name__}"
                              f"{' with other values' if isinstance(data, dict) else ''}; re-save the adapter")
    return data


def _weight_path(directory: str, paths: dict[str, str], allow_pickle: bool) -> tuple[str, bool]:
    st_path, bin_path = paths[WEIGHTS_NAME], paths[PICKLE_WEIGHTS_NAME]
    if st_path is not None and os.path.lexists(st_path):
        return st_path, False
    if bin_path is not None and os.path.lexists(bin_path):
        if not allow_pickle:
            raise CheckpointError(
                f"{directory} holds only {PICKLE_WEIGHTS_NAME}, a pickle file; graftkit does not unpickle by default. "
                "If you trust its origin, pass allow_pickle=True (it is read with torch.load(weights_only=True)), "
                "then re-save it as safetensors"
            )
        return bin_path, True
    present = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    raise CheckpointError(
        f"{directory}: no {WEIGHTS_NAME} (or {PICKLE_WEIGHTS_NAME}); files there: {present[:20]}. "
        "Point to the folder that save_pretrained wrote"
    )


def check_tensors(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse non-floating tensors; warn, naming them, about tensors holding NaN or Inf."""
    wrong = [f"{k} ({str(t.dtype).replace('torch.', '')})" for k, t in tensors.items() if t.dtype not in FLOAT_DTYPES]
    if wrong:
        raise CheckpointError(
            f"{source}: adapter tensors must be float16, bfloat16, float32 or float64; {len(wrong)} are not, "
            f"e.g. {wrong[:5]}. The file is damaged or is not an adapter; re-save it"
        )
    bad = [k for k, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        warnings.warn(f"{source}: {len(bad)} adapter tensor(s) hold NaN or Inf values, e.g. {bad[:5]}; the model's "
                      "outputs will not be finite where they are used, and merging them is refused", stacklevel=4)


def _check_record(config: PeftConfig, metadata: dict[str, str], weights: str, config_path: str) -> None:
    raw = metadata.get(RECORD_KEY)
    if raw is None:
        return  # written by another library: nothing to compare
    try:
        record = json.loads(raw)
        if not isinstance(record, dict):
            raise ValueError(type(record).__name__)
    except (ValueError, RecursionError):
        raise CheckpointError(f"{weights}: the record of the config these weights were saved with is damaged; "
                              "re-save the adapter") from None
    current = json.loads(json.dumps(config.semantic_dict(), sort_keys=True))
    differ = sorted(k for k in record if current.get(k) != record[k])
    if differ:
        shown = ", ".join(f"{k}: {current.get(k)!r} in the config, {record[k]!r} for the weights" for k in differ[:4])
        raise CheckpointError(
            f"{config_path} and {os.path.basename(weights)} come from different saves ({shown}). Loading them "
            "together would compute something neither save held: restore the matching adapter_config.json or "
            "save the adapter again"
        )


def read_checkpoint(directory: str, allow_pickle: bool = False, config: PeftConfig | None = None
                    ) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """The config and tensors (on CPU) of an adapter folder, checked: the files are regular files, the weights
    parse, the tensors are floating point, and the weights were saved with this config (when they say so).

    Args:
        config: use this config instead of the folder's ``adapter_config.json`` (no pairing check then).

    Raises:
        ConfigError: the config file is missing or invalid.
        CheckpointError: missing, unreadable or damaged weights, a pickle file without ``allow_pickle``, or a
            weights file and config from two different saves.
    """
    paths = checkpoint_paths(directory)
    weights, pickled = _weight_path(directory, paths, allow_pickle)
    paired = config is None
    if config is None:
        config = PeftConfig.from_json_file(paths[CONFIG_NAME])
    if pickled:
        tensors, metadata = _read_pickle(weights), {}
    else:
        tensors, metadata = _read_safetensors(weights)
    if paired:
        _check_record(config, metadata, weights, os.path.join(directory, CONFIG_NAME))
    check_tensors(tensors, weights)
    return config, tensors


# ---------------------------------------------------------------------------------------------- finding
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
    if not isinstance(model_id, (str, os.PathLike)):
        raise CheckpointError(f"an adapter location must be a path or a Hub id, got {type(model_id).__name__}")
    model_id = os.fspath(model_id)
    if os.path.isfile(model_id):
        raise CheckpointError(f"'{model_id}' is a file; pass the adapter's folder (the one holding {filename})")
    folder = os.path.join(model_id, subfolder or "")
    local = os.path.join(folder, filename)
    if os.path.isdir(model_id):
        if os.path.lexists(local) or (os.path.isdir(folder) and os.path.lexists(os.path.join(folder, JOURNAL_NAME))):
            return local
        present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
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

