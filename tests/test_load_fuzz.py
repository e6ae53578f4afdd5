"""Loader fuzzing: byte-level mutations of a valid adapter folder (fixed seed).

Every outcome must be a :class:`graftkit.GraftkitError`, or a load in which nothing but tensor *values* changed:
the config computes the same adapter (only bookkeeping fields such as ``base_model_name_or_path`` may differ)
and every tensor equals the original unless the mutation hit that tensor's own data bytes.
"""

from __future__ import annotations

import json
import random
import shutil
import warnings

import torch

import graftkit
from tests.conftest import randomize_adapters, tiny_llama

CASES = 400
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def data_ranges(raw: bytes) -> dict[str, tuple[int, int]]:
    """Byte range of each tensor's data in a safetensors file."""
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    start = 8 + size
    return {k: (start + v["data_offsets"][0], start + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def mutate(raw: bytes, rng: random.Random) -> tuple[bytes, str, int | None]:
    """(mutated bytes, kind, position of an in-place change or None)."""
    data = bytearray(raw)
    kind = rng.choice(["flip", "byte", "byte", "insert", "delete", "truncate", "digit"])
    pos = rng.randrange(len(data))
    if kind == "flip":
        data[pos] ^= 1 << rng.randrange(8)
    elif kind == "byte":
        data[pos] = rng.randrange(256)
    elif kind == "insert":
        data[pos:pos] = bytes([rng.randrange(256)])
        return bytes(data), kind, None
    elif kind == "delete":
        del data[pos]
        return bytes(data), kind, None
    elif kind == "truncate":
        return bytes(data[:pos]), kind, None
    else:  # change one ASCII digit (lengths, offsets, shapes, numbers in the config)
        digits = [i for i, b in enumerate(data) if 48 <= b <= 57]
        pos = rng.choice(digits)
        data[pos] = 48 + (data[pos] - 48 + rng.randrange(1, 10)) % 10
    return bytes(data), kind, pos


def test_mutated_adapter_files_load_unchanged_or_fail_with_a_graftkit_error(tmp_path):
    good = tmp_path / "good"
    model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=2, lora_alpha=4, use_rslora=True,
                                                                      target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    model.save_pretrained(good)
    original = {k: v.detach().clone() for k, v in model.get_adapter_state_dict().items()}
    semantic = graftkit.PeftConfig.from_pretrained(good).semantic_dict()
    files = {name: (good / name).read_bytes() for name in (CONFIG, WEIGHTS)}
    ranges = data_ranges(files[WEIGHTS])
    rng = random.Random(1202)
    case_dir = tmp_path / "case"
    outcomes = {"error": 0, "load": 0}
    failures = []
    for case in range(CASES):
        target = WEIGHTS if rng.random() < 0.7 else CONFIG
        mutated, kind, pos = mutate(files[target], rng)
        shutil.rmtree(case_dir, ignore_errors=True)
        shutil.copytree(good, case_dir)
        (case_dir / target).write_bytes(mutated)
        base = tiny_llama()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # NaN/Inf and unknown-key warnings are allowed outcomes
                loaded = graftkit.PeftModel.from_pretrained(base, case_dir)
        except graftkit.GraftkitError:
            outcomes["error"] += 1
            continue
        except BaseException as exc:  # noqa: BLE001 - every other outcome is a failure to report
            failures.append(f"case {case} ({target}, {kind} at {pos}): {type(exc).__name__}: {str(exc)[:120]}")
            continue
        outcomes["load"] += 1
        if loaded.peft_config["default"].semantic_dict() != semantic:
            failures.append(f"case {case} ({target}, {kind} at {pos}): loaded a different config")
            continue
        hit = {k for k, (lo, hi) in ranges.items() if target == WEIGHTS and pos is not None and lo <= pos < hi}
        got = loaded.get_adapter_state_dict()
        changed = {k for k, v in original.items() if not torch.equal(got[k].detach().cpu(), v.cpu(), )} \
            if set(got) == set(original) else {"<tensor names>"}
        if changed - hit:
            failures.append(f"case {case} ({target}, {kind} at {pos}): tensors changed outside the mutated bytes: "
                            f"{sorted(changed - hit)[:3]}")
    assert not failures, f"{len(failures)} of {CASES} cases: " + "\n".join(failures[:20])
    assert outcomes["error"] >= CASES // 4 and outcomes["load"] >= CASES // 10, outcomes  # both paths exercised
