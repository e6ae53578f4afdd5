"""Nothing lost, nothing silently wrong: shared bases, checkpoint units, checked configs and files, refused merges.

Each test builds what it needs from its own seeds; outputs are compared bit for bit where the promise is "as it was".
"""

from __future__ import annotations

import json
import math
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

import graftkit
from graftkit import io as gio
from graftkit.layer import AdaptedLayer
from tests.conftest import randomize_adapters, run, tiny_llama, token_batch

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
README = "README.md"  # the model card every save writes, as HF peft does


def lora(**kwargs) -> graftkit.LoraConfig:
    return graftkit.LoraConfig(**{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], **kwargs})


def trained(seed: int = 3, **kwargs) -> graftkit.PeftModel:
    model = graftkit.get_peft_model(tiny_llama(), lora(**kwargs))
    randomize_adapters(model, seed=seed)
    return model.eval()


def wrapper_count(model: torch.nn.Module) -> int:
    return sum(isinstance(m, AdaptedLayer) for m in model.modules())


# ---------------------------------------------------------------------------------------------- shared bases
def test_failed_load_onto_a_shared_base_leaves_the_first_model_as_it_was(tmp_path):
    other = trained(seed=5, r=4)
    other.save_pretrained(tmp_path / "other")
    base = tiny_llama()
    p1 = graftkit.get_peft_model(base, lora())
    randomize_adapters(p1, seed=7)
    p1.eval()
    x = token_batch()
    before = run(p1, x)
    with pytest.raises(graftkit.UsageError, match="already carries graftkit adapter layers"):
        graftkit.PeftModel.from_pretrained(base, tmp_path / "other", adapter_name="other")
    with pytest.raises(graftkit.UsageError, match="add_adapter"):
        graftkit.get_peft_model(base, lora(), adapter_name="second")
    with pytest.raises(graftkit.UsageError, match="already a PeftModel"):
        graftkit.get_peft_model(p1, lora())
    with pytest.raises(graftkit.UsageError, match="base of a PeftModel"):
        graftkit.inject_adapter_in_model(lora(), base, adapter_name="third")
    assert torch.equal(run(p1, x), before)
    # a load into p1 itself that fails after its layers were built leaves p1 as it was too
    with_extra_tensor(tmp_path / "other")
    with pytest.raises(graftkit.CheckpointError, match="unexpected"):
        p1.load_adapter(tmp_path / "other", adapter_name="other")
    assert list(p1.peft_config) == ["default"]
    assert torch.equal(run(p1, x), before)
    p1.save_pretrained(tmp_path / "p1")
    again = graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "p1").eval()
    assert torch.equal(run(again, x), before)


def with_extra_tensor(folder) -> None:
    """Add a tensor no model has: the load fails only after the adapter layers were built."""
    weights = folder / WEIGHTS
    tensors = load_file(weights)
    tensors["base_model.model.model.nowhere.lora_A.weight"] = torch.ones(2, 2)
    save_file(tensors, weights, {"format": "pt"})


def test_failed_from_pretrained_restores_the_base_exactly(tmp_path):
    trained(r=4).save_pretrained(tmp_path)
    with_extra_tensor(tmp_path)
    base = tiny_llama()
    base.lm_head.weight.requires_grad_(False)  # a user's own freezing must survive the failed call
    grads = {n: p.requires_grad for n, p in base.named_parameters()}
    x = token_batch()
    before = run(base, x)
    with pytest.raises(graftkit.CheckpointError, match="unexpected"):
        graftkit.PeftModel.from_pretrained(base, tmp_path)
    assert wrapper_count(base) == 0
    assert {n: p.requires_grad for n, p in base.named_parameters()} == grads
    assert torch.equal(run(base, x), before)


def test_shape_check_happens_before_allocating_by_config_r(tmp_path):
    trained().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG).read_text())
    cfg["r"] = 10**9  # would need gigabytes per layer if anything were built from it
    (tmp_path / CONFIG).write_text(json.dumps(cfg))
    weights = tmp_path / WEIGHTS
    save_file(load_file(weights), weights, {"format": "pt"})  # no pairing record: the shapes must catch it
    with pytest.raises(graftkit.CheckpointError, match=r"\(2, 16\) in the file.*\(1000000000, 16\)"):
        graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)


# ---------------------------------------------------------------------------------------------- checkpoint units
def test_weights_and_config_from_two_saves_are_refused(tmp_path):
    trained(lora_alpha=4).save_pretrained(tmp_path / "a")
    trained(lora_alpha=16).save_pretrained(tmp_path / "b")
    os.replace(tmp_path / "b" / CONFIG, tmp_path / "a" / CONFIG)
    with pytest.raises(graftkit.CheckpointError, match=r"different saves \(lora_alpha: 16 in the config, 4 for"):
        graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")


def test_bookkeeping_edits_to_the_config_still_load(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG).read_text())
    cfg["base_model_name_or_path"] = "/somewhere/else"
    (tmp_path / CONFIG).write_text(json.dumps(cfg, indent=4))
    x = token_batch()
    assert torch.equal(run(graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval(), x), run(model, x))


def test_saved_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        trained().save_pretrained(tmp_path)
    finally:
        os.umask(old)
    for name in (CONFIG, WEIGHTS):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name


def test_switching_format_removes_the_stale_weights(tmp_path):
    first, second = trained(seed=3), trained(seed=4)
    first.save_pretrained(tmp_path)
    second.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(os.listdir(tmp_path)) == [README, CONFIG, "adapter_model.bin"]
    x = token_batch()
    loaded = graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path, allow_pickle=True).eval()
    assert torch.equal(run(loaded, x), run(second, x))
    first.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [README, CONFIG, WEIGHTS]


def _outputs_of(folder, x) -> torch.Tensor:
    return run(graftkit.PeftModel.from_pretrained(tiny_llama(), folder).eval(), x)


class Stop(BaseException):
    """Stands for the process dying at this point (no except-clause of graftkit's handles it)."""


@pytest.mark.parametrize("step", range(11))
def test_a_save_stopped_at_any_step_leaves_the_old_or_the_new_checkpoint(tmp_path, monkeypatch, step):
    old, new = trained(seed=3), trained(seed=4, r=4)
    x = token_batch()
    old.save_pretrained(tmp_path)
    want_old, want_new = run(old, x), run(new, x)
    calls = {"n": 0}
    real_replace, real_fsync = os.replace, os.fsync

    def counting(fn):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == step + 1:
                raise Stop()
            return fn(*args, **kwargs)
        return wrapper

    # The steps of a save, in order: fsync weights, config, card (README.md) and staging folder, fsync journal,
    # commit rename, three renames, two folder fsyncs
    monkeypatch.setattr(gio.os, "replace", counting(real_replace))
    monkeypatch.setattr(gio.os, "fsync", counting(real_fsync))
    with pytest.raises(Stop):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    got = _outputs_of(tmp_path, x)
    assert torch.equal(got, want_old) or torch.equal(got, want_new)
    new.save_pretrained(tmp_path)  # the next save cleans up whatever the stopped one left
    assert sorted(os.listdir(tmp_path)) == [README, CONFIG, WEIGHTS]
    assert torch.equal(_outputs_of(tmp_path, x), want_new)


def test_a_failing_writer_keeps_the_old_checkpoint_and_leaves_no_temp_files(tmp_path, monkeypatch):
    old, new = trained(seed=3), trained(seed=4)
    x = token_batch()
    old.save_pretrained(tmp_path)

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gio, "save_file", disk_full)
    with pytest.raises(graftkit.SaveError, match="No space left") as err:
        new.save_pretrained(tmp_path)
    assert isinstance(err.value, OSError)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == [README, CONFIG, WEIGHTS]
    assert torch.equal(_outputs_of(tmp_path, x), run(old, x))


def save_stopped_after_commit(model: graftkit.PeftModel, folder, monkeypatch) -> None:
    """Save ``model`` into ``folder`` and stop the process (as if killed) right after the commit point."""
    real_replace = os.replace

    def stop_after_commit(src, dst):
        real_replace(src, dst)
        if os.path.basename(dst) == gio.JOURNAL_NAME:
            raise Stop()

    monkeypatch.setattr(gio.os, "replace", stop_after_commit)
    with pytest.raises(Stop):
        model.save_pretrained(folder)
    monkeypatch.undo()
    assert gio.JOURNAL_NAME in os.listdir(folder)


def test_a_committed_save_in_a_read_only_folder_is_read_through_its_journal(tmp_path, monkeypatch):
    old, new = trained(seed=3), trained(seed=4, lora_alpha=8)
    x = token_batch()
    old.save_pretrained(tmp_path)
    save_stopped_after_commit(new, tmp_path, monkeypatch)

    def read_only(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(gio, "_replay", read_only)
    assert torch.equal(_outputs_of(tmp_path, x), run(new, x))
    monkeypatch.undo()
    assert torch.equal(_outputs_of(tmp_path, x), run(new, x))  # a writable folder is finished by the load
    assert sorted(os.listdir(tmp_path)) == [README, CONFIG, WEIGHTS]


def test_saving_into_a_read_only_folder_keeps_its_checkpoint(tmp_path, monkeypatch):
    old = trained(seed=3)
    old.save_pretrained(tmp_path)
    if os.geteuid() != 0:
        os.chmod(tmp_path, 0o555)
    else:  # root ignores folder permissions: the folder refuses new entries the way a read-only one does

        def refuse(*_args, **_kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(gio.os, "mkdir", refuse)
    try:
        with pytest.raises(graftkit.SaveError, match="Permission denied"):
            trained(seed=4).save_pretrained(tmp_path)
    finally:
        os.chmod(tmp_path, 0o755)
        monkeypatch.undo()
    x = token_batch()
    assert sorted(os.listdir(tmp_path)) == [README, CONFIG, WEIGHTS]
    assert torch.equal(_outputs_of(tmp_path, x), run(old, x))


def test_saving_into_an_unwritable_place_is_a_save_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(graftkit.CheckpointError, match="it is a file"):
        trained().save_pretrained(tmp_path / "file")
    with pytest.raises(graftkit.SaveError, match="cannot save"):
        trained().save_pretrained("/proc/graftkit-cannot-write-here")


def test_saving_a_model_without_adapter_tensors_is_refused(tmp_path):
    model = trained()
    model.merge_and_unload()
    with pytest.raises(graftkit.UsageError, match="no tensors in the model"):
        model.save_pretrained(tmp_path)
    assert not os.path.exists(tmp_path / WEIGHTS)
    model.save_pretrained(tmp_path, allow_empty=True)
    assert load_file(tmp_path / WEIGHTS) == {}


# ---------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(("field", "value", "message"), [
    ("lora_alpha", math.nan, "lora_alpha must be a finite number"),
    ("lora_alpha", math.inf, "lora_alpha must be a finite number"),
    ("lora_alpha", "16", "lora_alpha must be a number"),
    ("use_rslora", "false", "use_rslora must be true or false"),
    ("use_dora", 1, "use_dora must be true or false"),
    ("r", 0, "r must be a positive integer"),
    ("r", 2.5, "r must be an integer"),
    ("lora_dropout", 1.0, r"lora_dropout must be in \[0, 1\)"),
    ("target_modules", "q_proj(", "not a valid regular expression"),
    ("target_modules", 7, "target_modules must be a list of strings or a string"),
    ("exclude_modules", ["ok", None], r"exclude_modules\[1\] must be a string"),
    ("layers_to_transform", [0, -1], "negative layer index"),
    ("rank_pattern", {"q_proj": "4"}, r"rank_pattern\['q_proj'\] must be an integer"),
    ("rank_pattern", {"(": 4}, "not a valid regular expression"),
    ("alpha_pattern", ["q_proj"], "alpha_pattern must be a mapping"),
    ("modules_to_save", [3], r"modules_to_save\[0\] must be a string"),
])
def test_bad_config_values_name_field_value_and_what_is_allowed(field, value, message):
    with pytest.raises(graftkit.ConfigError, match=message):
        graftkit.LoraConfig(**{field: value})
    data = lora().to_dict()
    data[field] = value
    with pytest.raises(graftkit.ConfigError, match=message):
        graftkit.PeftConfig.from_dict(data)


def test_a_misspelled_keyword_in_code_names_the_field():
    with pytest.raises(graftkit.ConfigError, match="no field 'lora_aplha'; did you mean 'lora_alpha'") as err:
        graftkit.LoraConfig(r=4, lora_aplha=16)
    assert isinstance(err.value, TypeError)  # what Python raises for an unknown keyword
    with pytest.raises(graftkit.ConfigError, match="HF peft that graftkit does not implement"):
        graftkit.LoraConfig(use_qalora=True)


def test_a_misspelled_key_in_a_file_names_the_field(tmp_path):
    trained(lora_alpha=4).save_pretrained(tmp_path)
    text = (tmp_path / CONFIG).read_text().replace('"lora_alpha"', '"lora_alpah"')
    (tmp_path / CONFIG).write_text(text)
    with pytest.raises(graftkit.ConfigError, match="did you mean 'lora_alpha'"):
        graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    data = lora().to_dict()
    data["an_option_from_a_newer_release"] = 1  # far from every known name: a warning, as before
    with pytest.warns(UserWarning, match="an_option_from_a_newer_release"):
        graftkit.PeftConfig.from_dict(data)


def test_nan_alpha_and_string_booleans_in_a_file_are_refused(tmp_path):
    trained().save_pretrained(tmp_path)
    for key, raw in (("lora_alpha", "NaN"), ("use_rslora", '"false"')):
        data = json.loads((tmp_path / CONFIG).read_text())
        text = json.dumps(data).replace(f'"{key}": {json.dumps(data[key])}', f'"{key}": {raw}')
        (tmp_path / "bad").mkdir(exist_ok=True)
        (tmp_path / "bad" / CONFIG).write_text(text)
        with pytest.raises(graftkit.ConfigError, match=key):
            graftkit.PeftConfig.from_pretrained(tmp_path / "bad")


def test_config_files_that_are_not_configs(tmp_path):
    cases = {
        "latin1": "{\"peft_type\": \"LORA\", \"r\": 2, \"x\": \"\xe9\"}".encode("latin-1"),
        "nested": b"[" * 100000 + b"]" * 100000,
        "list": b"[1, 2]",
    }
    for name, raw in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / CONFIG).write_bytes(raw)
        with pytest.raises(graftkit.ConfigError):
            graftkit.PeftConfig.from_pretrained(tmp_path / name)


def test_config_given_as_a_dict_or_wrong_type():
    model = graftkit.get_peft_model(tiny_llama(), lora().to_dict())
    assert model.peft_config["default"].r == 2
    with pytest.raises(graftkit.ConfigError, match="expected an adapter config"):
        graftkit.get_peft_model(tiny_llama(), ["r", 2])


# ---------------------------------------------------------------------------------------------- tensors in files
def test_non_float_tensors_are_refused(tmp_path):
    trained().save_pretrained(tmp_path)
    weights = tmp_path / WEIGHTS
    raw = bytearray(weights.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + header_len].decode()
    assert '"F32"' in header
    raw[8:8 + header_len] = header.replace('"F32"', '"I32"', 1).encode()  # same size: reinterpreted bytes
    weights.write_bytes(bytes(raw))
    base = tiny_llama()
    with pytest.raises(graftkit.CheckpointError, match=r"must be float16, bfloat16, float32 or float64.*int32"):
        graftkit.PeftModel.from_pretrained(base, tmp_path)
    assert wrapper_count(base) == 0


def test_nan_values_warn_naming_the_tensors_and_merging_them_is_refused(tmp_path):
    model = trained()
    key = next(k for k in model.state_dict() if "lora_B" in k)
    with torch.no_grad():
        model.get_parameter(key)[0, 0] = float("nan")
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"NaN or Inf.*lora_B"):
        loaded = graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    x = token_batch()
    before = run(loaded, x)
    weights = {n: p.detach().clone() for n, p in loaded.named_parameters() if "base_layer" in n}
    with pytest.raises(graftkit.UsageError, match="NaN/Inf"):
        loaded.merge_and_unload()
    with pytest.raises(graftkit.UsageError, match="NaN/Inf"):
        loaded.merge_adapter()
    assert all(torch.equal(p, weights[n]) for n, p in loaded.named_parameters() if "base_layer" in n)
    torch.testing.assert_close(run(loaded, x), before, rtol=0, atol=0, equal_nan=True)
    merged = loaded.merge_and_unload(allow_non_finite=True)
    assert not all(bool(torch.isfinite(p).all()) for p in merged.parameters())


def test_overflowing_merge_into_half_precision_is_refused():
    base = tiny_llama().to(torch.float16)
    model = graftkit.get_peft_model(base, lora())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.fill_(300.0)  # 2 * 300 * 300 * 16 overflows float16
    q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    with pytest.raises(graftkit.UsageError, match="NaN/Inf"):
        model.merge_adapter()
    assert torch.equal(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, q)


def test_pickle_files_that_do_not_hold_tensors(tmp_path):
    trained().save_pretrained(tmp_path, safe_serialization=False)
    for payload in ([1, 2], None, {"a": 1}):
        torch.save(payload, tmp_path / "adapter_model.bin")
        with pytest.raises(graftkit.CheckpointError, match="expected a mapping of tensor names to tensors"):
            graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path, allow_pickle=True)


@pytest.mark.parametrize("kind", ["folder", "dangling", "fifo"])
def test_weights_path_that_is_not_a_file_is_named_as_such(tmp_path, kind):
    trained().save_pretrained(tmp_path)
    os.remove(tmp_path / WEIGHTS)
    if kind == "folder":
        os.mkdir(tmp_path / WEIGHTS)
    elif kind == "dangling":
        os.symlink(tmp_path / "nowhere", tmp_path / WEIGHTS)
    else:
        os.mkfifo(tmp_path / WEIGHTS)  # opening it would block forever
    expected = {"folder": "is a folder", "dangling": "dangling symbolic link", "fifo": "not a regular file"}[kind]
    with pytest.raises(graftkit.CheckpointError, match=expected):
        graftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)


# ---------------------------------------------------------------------------------------------- names and routing
@pytest.mark.parametrize("name", ["", " ", "a/b", "/abs/path", ".hidden", "a.b", "..", "a\\b", "x\0y", 3, None])
def test_adapter_names_that_cannot_be_module_keys_or_folders(tmp_path, name):
    model = trained()
    with pytest.raises(graftkit.AdapterNameError, match="adapter name"):
        model.add_adapter(name, lora())
    assert list(model.peft_config) == ["default"]
    with pytest.raises(graftkit.AdapterNameError):
        graftkit.get_peft_model(tiny_llama(), lora(), adapter_name=name)


def test_adapter_names_must_give_one_name_per_input_row():
    model = trained()
    model.add_adapter("b", lora())
    randomize_adapters(model, seed=9)
    x = token_batch(batch=4)
    with pytest.raises(graftkit.UsageError, match="one adapter name per input row"):
        model(**x, adapter_names=["default", "b"])
    with pytest.raises(graftkit.UsageError, match="one adapter name per input row"):
        model(**x, adapter_names=["b"])
    with pytest.raises(graftkit.UsageError, match="must be a list"):
        model(**x, adapter_names="b")
    with pytest.raises(graftkit.UsageError, match="one adapter name per input row"):
        model.generate(**x, adapter_names=["default", "b"], max_new_tokens=2)
    names = ["default", "b", "b", "default"]
    out = model.generate(**x, adapter_names=names, max_new_tokens=3, num_beams=2, num_return_sequences=2,
                         do_sample=False, pad_token_id=0)
    for i, name in enumerate(names):  # each input row's two returned beams come from its own adapter
        model.set_adapter(name)
        alone = model.generate(input_ids=x["input_ids"][i:i + 1], attention_mask=x["attention_mask"][i:i + 1],
                               max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False, pad_token_id=0)
        assert torch.equal(out[2 * i:2 * i + 2], alone)


def test_set_adapter_with_no_names_is_refused():
    model = trained()
    with pytest.raises(graftkit.UsageError, match="at least one adapter name"):
        model.set_adapter([])
    assert model.active_adapters == ["default"]


# ---------------------------------------------------------------------------------------------- command line
def test_cli_reports_a_damaged_adapter_in_one_line(tmp_path, capsys):
    from graftkit.cli import main

    trained().save_pretrained(tmp_path)
    (tmp_path / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("graftkit inspect: error:") and "not a readable safetensors file" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_every_public_error_is_a_graftkit_error_and_the_builtin_users_catch():
    assert issubclass(graftkit.UsageError, ValueError)
    assert issubclass(graftkit.SaveError, OSError)
    for cls in (graftkit.UsageError, graftkit.SaveError, graftkit.ConfigError, graftkit.CheckpointError):
        assert issubclass(cls, graftkit.GraftkitError)
