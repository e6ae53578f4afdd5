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
import stat
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import CONFIG_NAME, PeftConfig, check_regular_file, read_regular_file
from .errors import CheckpointError, SaveError
from .weights import all_finite

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
JOURNAL_NAME = ".graftkit-save.json"
TMP_PREFIX = ".graftkit-"
RECORD_KEY = "graftkit.adapter_config"  # safetensors metadata key: the config the weights were saved with
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
COUNTER_SUFFIX = ".num_batches_tracked"  # BatchNorm's step counter: the one integer tensor a saved module holds
README_NAME = "README.md"  # the model card HF peft writes beside an adapter (its front matter merged, never dropped)
_CHECKPOINT_FILES = (CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME, README_NAME)
_WEIGHT_FILES = (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME)

try:
    import fcntl
except ImportError:  # Windows: no flock; saves into one folder are not serialized there
    fcntl = None


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


@contextlib.contextmanager
def folder_lock(directory: str, exclusive: bool) -> Iterator[None]:
    """Hold an advisory lock on ``directory`` (``flock`` on the folder itself, so no lock file is left behind):
    exclusive for a save or a replay, shared for a read. Two processes saving into one folder run one after the
    other, and a reader never sees a save half-replayed. Where the platform or filesystem has no ``flock``
    (Windows, some network filesystems) the block runs unlocked, as before."""
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError:
            pass  # no lock to be had here; the journal still keeps each checkpoint whole
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _damaged_journal(path: str, why: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: the record of an interrupted save {why}, so graftkit will not act on it. Delete it if the "
        "folder's adapter files are the ones you want, or save the adapter again"
    )


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
                 and "/" not in stage and "\\" not in stage and "\0" not in stage
                 and isinstance(names, list) and isinstance(remove, list)
                 and all(isinstance(n, str) and n in _CHECKPOINT_FILES for n in names + remove)
                 and len(set(names + remove)) == len(names + remove))
    except (ValueError, KeyError, TypeError, RecursionError):
        valid = False
    if not valid:
        raise _damaged_journal(path, "is damaged")
    return journal


def _stage_of(directory: str, journal: dict[str, Any]) -> str:
    """The journal's staging folder: a real folder directly inside ``directory``, never reached through a link
    (a crafted journal whose staging "folder" links elsewhere would otherwise move another folder's files here).

    Raises:
        CheckpointError: the staging folder is a link, not a folder, or missing.
    """
    stage = os.path.join(directory, journal["stage"])
    try:
        info = os.lstat(stage)
    except FileNotFoundError:
        raise _damaged_journal(os.path.join(directory, JOURNAL_NAME),
                               f"names a staging folder ({journal['stage']}) that is not there") from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a folder"
        raise _damaged_journal(os.path.join(directory, JOURNAL_NAME),
                               f"names a staging folder ({journal['stage']}) that is {kind}")
    return stage


def _staged(directory: str, stage: str, name: str) -> bool:
    """Whether ``name`` still waits in the staging folder (``False``: moved into place already).

    Raises:
        CheckpointError: the staged entry is a link or not a regular file.
    """
    try:
        info = os.lstat(os.path.join(stage, name))
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(info.st_mode):
        raise _damaged_journal(os.path.join(directory, JOURNAL_NAME),
                               f"stages {name} as a link or special file, not a file it wrote")
    return True


def _replay(directory: str, journal: dict[str, Any]) -> None:
    """Finish a committed save (idempotent: a replay cut short is finished by the next one). The caller holds
    the folder's exclusive lock.

    Readers that do not replay journals (HF peft, vLLM) must never find a new file beside an old one: the old
    copies of the staged files go first, then the new files move in, the weights last. In between such a reader
    finds no weights (an error it reports) rather than a mismatched pair.
    """
    stage = _stage_of(directory, journal)
    pending = [name for name in journal["files"] if _staged(directory, stage, name)]
    for name in pending + journal["remove"]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(directory, name))
    for name in sorted(pending, key=lambda n: n in _WEIGHT_FILES):
        os.replace(os.path.join(stage, name), os.path.join(directory, name))
    _fsync_dir(directory)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(directory, JOURNAL_NAME))
    _fsync_dir(directory)
    shutil.rmtree(stage, ignore_errors=True)


def recover(directory: str) -> None:
    """Finish the committed save an earlier process was killed in (if any), and remove what saves killed before
    their commit point left behind. A journal graftkit cannot trust (damaged, or staging through a link) is
    dropped unread: the save about to run replaces the files it would have named. The caller holds the folder's
    exclusive lock. Raises ``OSError`` when the folder cannot be written."""
    try:
        journal = _read_journal(directory)
        if journal is not None:
            _replay(directory, journal)
    except CheckpointError:
        os.remove(os.path.join(directory, JOURNAL_NAME))
    for entry in os.listdir(directory):
        if entry.startswith(TMP_PREFIX) and entry.endswith(".tmp"):
            path = os.path.join(directory, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)


def _write_failure(exc: BaseException) -> str | None:
    """Why a writer failed, when it is the disk's or the folder's fault (full disk, file-size limit, permissions);
    ``None`` for anything else (a bug, an interrupt), which is raised as it is."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if isinstance(exc, SafetensorError) or (isinstance(exc, RuntimeError) and "write" in str(exc).lower()):
        return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return None


def save_checkpoint(directory: str, files: dict[str, Callable[[str], None]], stale: list[str] = ()) -> None:
    """Write one checkpoint folder as a unit: ``files`` maps each file name to a writer ``write(path)``; the
    names in ``stale`` are removed in the same step (the other format's weights).

    The writers write into a staging folder inside ``directory`` (so their own temporary files, if any, stay
    there); a journal naming the staged files is the commit point. Files get the mode the umask gives ordinary
    files. A failure before the commit point removes the staging folder and leaves the old checkpoint as it was.
    Saves into one folder from several processes run one after the other (:func:`folder_lock`).

    Raises:
        SaveError: the folder cannot be created or written (permissions, full disk, a file-size limit; the
            message says which); the old checkpoint is intact.
        CheckpointError: ``directory`` is a file.
    """
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError(f"cannot save the adapter to '{directory}': it is a file; pass a folder path")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise SaveError(f"cannot save the adapter to '{directory}': {exc.strerror or exc}. Check that the folder is "
                        "writable and its parents are folders") from exc
    with folder_lock(directory, exclusive=True):
        _save_locked(directory, files, stale)


def _save_locked(directory: str, files: dict[str, Callable[[str], None]], stale: list[str]) -> None:
    token = secrets.token_hex(6)
    stage_name = f"{TMP_PREFIX}{token}.tmp"
    stage = os.path.join(directory, stage_name)
    try:
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
        why = _write_failure(exc)
        if why is not None:
            raise SaveError(f"cannot save the adapter to '{directory}': {why}. The previous checkpoint there is "
                            "unchanged; free disk space (or raise the file-size limit) and save again") from exc
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


def model_card(directory: str, base_model: str | None, tags: list[str]) -> str | None:
    """The text of ``directory``'s README.md after a save: the card there with ``library_name: peft``, the base
    model and ``tags`` merged into its front matter (its own tags and text kept), or a short new card. ``None``
    (with a warning) when an existing card's front matter cannot be read: it is left as it is.
    """
    from huggingface_hub import ModelCard, ModelCardData

    path = os.path.join(directory, README_NAME)
    if os.path.isfile(path):
        try:
            card = ModelCard.load(path)
            data, body = card.data.to_dict(), card.text
        except Exception as exc:  # noqa: BLE001 - a hand-written card: never lost to a save
            warnings.warn(f"{path}: its front matter cannot be read ({str(exc)[:100]}); the card is left as it is",
                          stacklevel=4)
            return None
    else:
        import importlib.metadata

        try:
            version = f" {importlib.metadata.version('graftkit')}"
        except importlib.metadata.PackageNotFoundError:  # run from a source tree
            version = ""
        data, body = {}, (f"\n# Adapter for {base_model or 'a model'}\n\nA parameter-efficient adapter in the PEFT "
                          f"format (adapter_config.json and adapter_model.safetensors), saved with graftkit{version}. "
                          "It loads with graftkit and with HF peft: `PeftModel.from_pretrained(base_model, path)`.\n")
    data["library_name"] = "peft"
    if base_model and not data.get("base_model"):
        data["base_model"] = base_model
    present = data.get("tags") or []
    present = [present] if isinstance(present, str) else list(present)
    data["tags"] = present + [t for t in tags if t not in present]
    return f"---\n{ModelCardData(**data).to_yaml()}\n---\n{body}"


def save_adapter_files(directory: str, config: PeftConfig, tensors: dict[str, torch.Tensor],
                       safe_serialization: bool = True, card: str | None = None) -> None:
    """Write one adapter folder (config + weights, and ``card`` as README.md when given) as one unit, removing the
    other format's weights file.

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

    files = {weights[0]: weights[1], CONFIG_NAME: text_writer(config_json)}
    if card is not None:
        files[README_NAME] = text_writer(card)
    save_checkpoint(directory, files, stale=[stale])


# ---------------------------------------------------------------------------------------------- reading
def checkpoint_paths(directory: str, write: bool = True) -> dict[str, str | None]:
    """Where each checkpoint file of ``directory`` is (``None``: not part of the checkpoint). A committed but
    unfinished save is finished first (``write``) or, in a folder graftkit cannot or may not write, read from the
    files its journal names.

    Raises:
        CheckpointError: a damaged journal, or one whose staging folder is not a real folder inside ``directory``.
    """
    paths: dict[str, str | None] = {name: os.path.join(directory, name) for name in _CHECKPOINT_FILES}
    journal = _read_journal(directory)
    if journal is None:
        return paths
    if write:
        try:
            with folder_lock(directory, exclusive=True):
                journal = _read_journal(directory)  # another process may have finished it meanwhile
                if journal is None:
                    return paths
                _replay(directory, journal)
                return paths
        except OSError:  # read-only: read the new files where they are
            journal = _read_journal(directory)
            if journal is None:
                return paths
    stage = _stage_of(directory, journal)
    for name in journal["files"]:
        if _staged(directory, stage, name):
            paths[name] = os.path.join(stage, name)
    for name in journal["remove"]:
        paths[name] = None  # removed by the committed save
    return paths


def _open_safetensors(path: str) -> Any:
    try:
        return safe_open(path, "pt", device="cpu")
    except BaseException as exc:  # safetensors raises SafetensorError, and a Rust panic for some headers
        if isinstance(exc, (KeyboardInterrupt, SystemExit, MemoryError)):
            raise
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(exc)[:200]}); re-save the adapter") \
            from None


_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
           "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
           "BOOL": torch.bool}
_HEADER_LIMIT = 100_000_000  # bytes; the safetensors library refuses longer headers too


def _header(path: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A safetensors file's metadata and its tensors as meta tensors (name, shape, dtype), from the header alone:
    no tensor data is read or mapped, so a header declaring a huge tensor costs nothing to look at.

    Raises:
        CheckpointError: not a safetensors header, a non-float dtype, or offsets past the end of the file.
    """
    check_regular_file(path, "the weights file", CheckpointError)

    def damaged(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a readable safetensors file ({why}); re-save the adapter")

    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise damaged("shorter than a header")
            length = int.from_bytes(prefix, "little")
            if length > min(_HEADER_LIMIT, size - 8):
                raise damaged(f"its header claims {length:,d} bytes")
            header = json.loads(fh.read(length).decode("utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the weights file ({exc.strerror or exc})") from None
    except (ValueError, RecursionError):
        raise damaged("its header is not JSON") from None
    if not isinstance(header, dict):
        raise damaged("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise damaged("its metadata is not a mapping of strings")
    out: dict[str, torch.Tensor] = {}
    for key, info in header.items():
        try:
            shape, offsets, code = info["shape"], info["data_offsets"], info["dtype"]
            valid = (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                     and isinstance(offsets, list) and len(offsets) == 2
                     and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1])
        except (TypeError, KeyError):
            valid = False
        if not valid:
            raise damaged(f"tensor '{key}' has no valid shape, dtype and offsets")
        if offsets[1] > size - 8 - length:
            raise damaged(f"tensor '{key}' ends at byte {offsets[1]:,d}, past the end of the file")
        dtype = _DTYPES.get(code)
        if dtype is None:
            raise CheckpointError(f"{path}: adapter tensors must be float16, bfloat16, float32 or float64; "
                                  f"'{key}' is {code!r:.20}. The file is damaged or is not an adapter; re-save it")
        out[key] = torch.empty(shape, dtype=dtype, device="meta")
    _check_dtypes(out, path)
    return metadata, out


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


def _check_dtypes(tensors: dict[str, torch.Tensor], source: str) -> None:
    wrong = [f"{k} ({str(t.dtype).replace('torch.', '')})" for k, t in tensors.items() if t.dtype not in FLOAT_DTYPES
             and not (k.endswith(COUNTER_SUFFIX) and t.dtype == torch.int64 and t.dim() == 0)]
    if wrong:
        raise CheckpointError(
            f"{source}: adapter tensors must be float16, bfloat16, float32 or float64; {len(wrong)} are not, "
            f"e.g. {wrong[:5]}. The file is damaged or is not an adapter; re-save it"
        )


def check_tensors(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse non-floating tensors; warn, naming them, about tensors holding NaN or Inf."""
    _check_dtypes(tensors, source)
    bad = [k for k, t in tensors.items() if not all_finite(t)]
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


ShapeCheck = Callable[[PeftConfig, dict[str, torch.Tensor]], None]


def read_checkpoint(directory: str, allow_pickle: bool = False, config: PeftConfig | None = None,
                    check_shapes: ShapeCheck | None = None) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """The config and tensors (on CPU) of an adapter folder, checked: the files are regular files, the weights
    parse, the tensors are floating point, and the weights were saved with this config (when they say so).

    Args:
        config: use this config instead of the folder's ``adapter_config.json`` (no pairing check then).
        check_shapes: called with the config and the file's tensors as meta tensors (names, shapes and dtypes
            from the safetensors header) before any tensor's data is read; it raises when they do not fit the
            model, so a header declaring a huge tensor is refused without allocating it.

    Raises:
        ConfigError: the config file is missing or invalid.
        CheckpointError: missing, unreadable or damaged weights, a pickle file without ``allow_pickle``, or a
            weights file and config from two different saves.
    """
    checkpoint_paths(directory)  # finish a committed save first, where the folder can be written
    with folder_lock(directory, exclusive=False):  # no save replays while the pair is read
        paths = checkpoint_paths(directory, write=False)
        weights, pickled = _weight_path(directory, paths, allow_pickle)
        paired = config is None
        if config is None:
            config = PeftConfig.from_json_file(paths[CONFIG_NAME])
        if pickled:
            tensors = _read_pickle(weights)  # pickles carry no record of their config
            if check_shapes is not None:
                check_shapes(config, {k: t.to("meta") for k, t in tensors.items()})
        else:
            metadata, meta = _header(weights)
            if paired:
                _check_record(config, metadata, weights, os.path.join(directory, CONFIG_NAME))
            if check_shapes is not None:
                check_shapes(config, meta)
            tensors = _read_tensors(weights)
    check_tensors(tensors, weights)
    return config, tensors


def read_weights(directory: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder's weights file alone (no config needed), checked as in
    :func:`read_checkpoint`."""
    checkpoint_paths(directory)
    with folder_lock(directory, exclusive=False):
        weights, pickled = _weight_path(directory, checkpoint_paths(directory, write=False), allow_pickle)
        if pickled:
            tensors = _read_pickle(weights)
        else:
            _header(weights)  # names, dtypes and offsets checked before any data is read
            tensors = _read_tensors(weights)
    check_tensors(tensors, weights)
    return tensors


def read_header(directory: str, allow_pickle: bool = False) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """The config and the tensors' names, shapes and dtypes (meta tensors) of an adapter folder, without reading
    any tensor data and without writing anything (a committed but unfinished save is read from its staging
    folder): what ``graftkit inspect`` shows."""
    with folder_lock(directory, exclusive=False):
        paths = checkpoint_paths(directory, write=False)
        weights, pickled = _weight_path(directory, paths, allow_pickle)
        config = PeftConfig.from_json_file(paths[CONFIG_NAME])
        if pickled:
            return config, {k: t.to("meta") for k, t in _read_pickle(weights).items()}
        metadata, meta = _header(weights)
        _check_record(config, metadata, weights, os.path.join(directory, CONFIG_NAME))
        return config, meta


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    try:
        with _open_safetensors(path) as fh:
            return {key: fh.get_tensor(key) for key in fh.keys()}
    except CheckpointError:
        raise
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit, MemoryError)):
            raise
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(exc)[:200]}); re-save the adapter") \
            from None


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
    if subfolder:
        parts = os.path.normpath(subfolder).split(os.sep)
        if os.path.isabs(subfolder) or ".." in parts or (os.altsep and os.altsep in subfolder):
            raise CheckpointError(f"subfolder={subfolder!r} leaves the adapter's folder; give a path inside it "
                                  "(e.g. 'adapters/first')")
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

