"""Adapter folders under attack and under faults: crafted journals, concurrent saves, full disks, header bombs.

A folder can come from anywhere (a tarball, a git clone): loading or inspecting it must never touch anything outside
it. Saves are serialized per folder, a writer that runs out of room is a SaveError, and no reader that ignores
graftkit's journal (HF peft, vLLM) ever finds a new file beside an old one.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import graftkit
from graftkit import io as gio
from graftkit.cli import main
from tests.conftest import HUNG_AFTER_S, randomize_adapters, run, tiny_llama, token_batch
from tests.test_reliability import Stop, save_stopped_after_commit

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
README = "README.md"  # the model card every save writes, as HF peft does
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trained(seed: int, base: str | None = None, **kwargs) -> graftkit.PeftModel:
    """A LoRA model with non-zero adapters; ``base``: a folder holding its base model (for AutoPeftModel)."""
    config = graftkit.LoraConfig(**{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], **kwargs})
    model = graftkit.get_peft_model(tiny_llama(), config)
    model.peft_config["default"].base_model_name_or_path = base
    randomize_adapters(model, seed=seed)
    return model.eval()


@pytest.fixture
def base(tmp_path) -> str:
    tiny_llama().save_pretrained(tmp_path / "base")
    return str(tmp_path / "base")


def snapshot(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder)) if (folder / name).is_file()}


def loaders(folder):
    """Every public way to read an adapter folder."""
    yield "from_pretrained", lambda: graftkit.PeftModel.from_pretrained(tiny_llama(), folder)
    yield "load_adapter", lambda: trained(1).load_adapter(folder, adapter_name="other")
    yield "AutoPeftModel", lambda: graftkit.AutoPeftModelForCausalLM.from_pretrained(folder)
    yield "config", lambda: graftkit.PeftConfig.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------- crafted journals
@pytest.mark.parametrize("target", ["relative", "absolute"])
def test_a_crafted_journal_never_moves_another_folders_files(tmp_path, target, capsys, base):
    victim, folder = tmp_path / "victim", tmp_path / "adapter"
    trained(3, base).save_pretrained(victim)
    trained(4, base, lora_alpha=8).save_pretrained(folder)
    stage = ".graftkit-0123456789ab.tmp"
    os.symlink("../victim" if target == "relative" else str(victim), folder / stage)
    (folder / gio.JOURNAL_NAME).write_text(json.dumps({"stage": stage, "files": [WEIGHTS, CONFIG], "remove": []}))
    victim_before, folder_before = snapshot(victim), snapshot(folder)
    for name, load in loaders(folder):
        with pytest.raises(graftkit.CheckpointError, match="symbolic link"):
            load()
        assert snapshot(victim) == victim_before, name
        assert snapshot(folder) == folder_before, name
    assert main(["inspect", str(folder)]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert snapshot(victim) == victim_before and snapshot(folder) == folder_before
    # saving over it removes the link, not what it points to
    trained(5).save_pretrained(folder)
    assert snapshot(victim) == victim_before
    assert sorted(os.listdir(folder)) == [README, CONFIG, WEIGHTS]


def test_a_journal_staging_links_or_missing_folders_is_refused(tmp_path):
    victim, folder = tmp_path / "victim", tmp_path / "adapter"
    trained(3).save_pretrained(victim)
    trained(4).save_pretrained(folder)
    stage = folder / ".graftkit-aaaaaaaaaaaa.tmp"
    stage.mkdir()
    os.symlink(victim / WEIGHTS, stage / WEIGHTS)  # a real staging folder holding a link to another file
    (folder / gio.JOURNAL_NAME).write_text(json.dumps({"stage": stage.name, "files": [WEIGHTS], "remove": []}))
    before = snapshot(victim)
    with pytest.raises(graftkit.CheckpointError, match="link or special file"):
        graftkit.PeftModel.from_pretrained(tiny_llama(), folder)
    assert os.path.islink(stage / WEIGHTS) and snapshot(victim) == before
    (folder / gio.JOURNAL_NAME).write_text(json.dumps({"stage": ".graftkit-bbbbbbbbbbbb.tmp", "files": [WEIGHTS],
                                                       "remove": [CONFIG]}))
    with pytest.raises(graftkit.CheckpointError, match="not there"):
        graftkit.PeftModel.from_pretrained(tiny_llama(), folder)
    assert (folder / CONFIG).exists()  # nothing acted on
    for stage_name in ("../victim", "/tmp", ".graftkit-x.tmp/../../victim"):
        (folder / gio.JOURNAL_NAME).write_text(json.dumps({"stage": stage_name, "files": [WEIGHTS], "remove": []}))
        with pytest.raises(graftkit.CheckpointError, match="damaged"):
            graftkit.PeftModel.from_pretrained(tiny_llama(), folder)
    assert snapshot(victim) == before


def test_inspect_reads_a_committed_save_without_writing(tmp_path, monkeypatch, capsys):
    old, new = trained(3), trained(4, r=4)
    old.save_pretrained(tmp_path)
    save_stopped_after_commit(new, tmp_path, monkeypatch)
    listing = sorted(os.listdir(tmp_path))
    before = snapshot(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    assert '"r": 4' in capsys.readouterr().out  # the committed (new) checkpoint
    assert sorted(os.listdir(tmp_path)) == listing and snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------- foreign readers
def _foreign_view(folder) -> str:
    """What a reader that ignores the journal sees: 'old', 'new', 'none' (no weights: an error it reports), or
    'mixed' (a new file beside an old one)."""
    names = set(os.listdir(folder))
    if WEIGHTS not in names:
        return "none"
    config = json.loads((folder / CONFIG).read_text())["r"] if CONFIG in names else None
    rank = load_file(folder / WEIGHTS)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0]
    if config != rank:
        return "mixed"
    return "old" if rank == 2 else "new"


@pytest.mark.parametrize("cut", range(1, 8))
def test_a_replay_cut_short_never_shows_other_readers_a_mixed_pair(tmp_path, monkeypatch, cut):
    """Kill the replay at each of its file operations: the top-level files are the old pair, no weights, or
    the new pair, and the next graftkit load finishes it."""
    x = token_batch()
    new = trained(4, r=4)
    trained(3).save_pretrained(tmp_path)
    calls = {"n": 0, "committed": False}
    real_replace, real_remove = os.replace, os.remove

    def counted(fn):
        def wrapper(src, *args):
            if calls["committed"]:
                calls["n"] += 1
                if calls["n"] == cut:
                    raise Stop()
            fn(src, *args)
            if fn is real_replace and os.path.basename(args[0]) == gio.JOURNAL_NAME:
                calls["committed"] = True
        return wrapper

    monkeypatch.setattr(gio.os, "replace", counted(real_replace))
    monkeypatch.setattr(gio.os, "remove", counted(real_remove))
    try:
        new.save_pretrained(tmp_path)
    except Stop:
        pass
    monkeypatch.undo()
    assert _foreign_view(tmp_path) != "mixed"
    loaded = graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert torch.equal(run(loaded, x), run(new, x))
    assert _foreign_view(tmp_path) == "new" and sorted(os.listdir(tmp_path)) == [README, CONFIG, WEIGHTS]


# ---------------------------------------------------------------------------------------------- full disks
def test_a_full_disk_is_a_save_error_naming_the_folder(tmp_path, monkeypatch):
    old = trained(3)
    old.save_pretrained(tmp_path)
    real_save_file = gio.save_file

    def onto_a_full_disk(tensors, _path, metadata=None):
        real_save_file(tensors, "/dev/full", metadata)  # the real writer meeting ENOSPC

    monkeypatch.setattr(gio, "save_file", onto_a_full_disk)
    with pytest.raises(graftkit.SaveError, match=f"cannot save the adapter to '{tmp_path}'") as err:
        trained(4).save_pretrained(tmp_path)
    assert isinstance(err.value, OSError)
    monkeypatch.undo()
    x = token_batch()
    assert sorted(os.listdir(tmp_path)) == [README, CONFIG, WEIGHTS]
    assert torch.equal(run(graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval(), x), run(old, x))


def test_a_file_size_limit_is_a_save_error_and_the_old_checkpoint_stays(tmp_path):
    trained(3).save_pretrained(tmp_path)
    before = snapshot(tmp_path)
    child = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {ROOT!r})
        import graftkit
        from tests.conftest import tiny_llama
        model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=64, target_modules=["q_proj", "v_proj"]))
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # smaller than the new weights file
        try:
            model.save_pretrained({str(tmp_path)!r})
        except graftkit.SaveError as err:
            print("SaveError", isinstance(err, OSError), err)
    """)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=HUNG_AFTER_S)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("SaveError True cannot save the adapter to"), out.stdout
    assert "File too large" in out.stdout or "os error 27" in out.stdout, out.stdout
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------- concurrent saves
def test_two_processes_saving_into_one_folder_take_turns(tmp_path):
    folder = tmp_path / "adapter"
    child = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        import graftkit
        from tests.conftest import randomize_adapters, tiny_llama
        seed = int(sys.argv[1])
        model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=2 + seed, target_modules=["q_proj"]))
        randomize_adapters(model, seed=seed)
        print("ready", flush=True)
        sys.stdin.readline()
        for _ in range(25):
            model.save_pretrained({str(folder)!r})
        print("saved", flush=True)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", child, str(seed)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    for proc in procs:  # both start saving at once
        proc.stdin.write("\n")
        proc.stdin.flush()
    for proc in procs:
        out, err = proc.communicate(timeout=HUNG_AFTER_S)
        assert proc.returncode == 0 and out.strip() == "saved", err
    assert sorted(os.listdir(folder)) == [README, CONFIG, WEIGHTS]
    loaded = graftkit.PeftModel.from_pretrained(tiny_llama(), folder)
    assert loaded.peft_config["default"].r in (3, 4)


# ---------------------------------------------------------------------------------------------- header bombs
def _sparse_bomb(folder, name: str) -> None:
    """A weights file whose header declares a [4, 2**33] float32 tensor over a sparse 128 GiB body."""
    length = 4 * 2**33 * 4
    header = json.dumps({name: {"dtype": "F32", "shape": [4, 2**33], "data_offsets": [0, length]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(folder / WEIGHTS, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        fh.truncate(8 + len(header) + length)  # no disk used: the filesystem leaves the hole unallocated


@pytest.mark.parametrize("name", ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                                  "base_model.model.somewhere.else.weight"])
def test_a_header_declaring_a_huge_tensor_is_refused_before_reading(tmp_path, name, capsys, base):
    trained(3, base).save_pretrained(tmp_path)
    try:
        _sparse_bomb(tmp_path, name)
    except OSError as err:  # a filesystem without sparse files or this file size
        pytest.skip(f"cannot create a sparse 128 GiB file here: {err}")
    try:
        for label, load in loaders(tmp_path):
            if label == "config":
                continue
            with pytest.raises(graftkit.CheckpointError, match=r"\(4, 8589934592\)"):
                load()
        assert main(["inspect", str(tmp_path), "--tensors"]) == 0  # shapes only: nothing is read
        assert "(4, 8589934592)" in capsys.readouterr().out
    finally:
        os.remove(tmp_path / WEIGHTS)
