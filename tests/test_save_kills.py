"""``kill -9`` in the middle of ``save_pretrained`` leaves a folder that loads the old or the new checkpoint.

A forked child re-saves two different adapters (r=8 and r=16, every linear layer) into one folder in a loop; the
parent kills it with SIGKILL at a random moment, then loads the folder and compares the outputs with both adapters,
bit for bit. Forking reuses the parent's imported modules and models, so each kill costs milliseconds, not an
interpreter start.

The kill window follows the machine: it spans about four saves as measured just before (so on a loaded machine the
window is wider), and it widens while the kills have not yet shown both checkpoints. Only the number of kills
depends on the machine's speed, never the outcome.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time

import pytest
import torch

import graftkit
from graftkit import io as gio
from tests.conftest import randomize_adapters, run, tiny_llama, token_batch

KILLS = 30  # at least this many kills
MAX_KILLS = 300  # and at most this many, widening the window until both checkpoints and interrupted saves are seen


def adapter(r: int, seed: int) -> graftkit.PeftModel:
    config = graftkit.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear")
    model = graftkit.get_peft_model(tiny_llama(), config)
    randomize_adapters(model, seed=seed)
    return model.eval()


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs fork() and SIGKILL")
def test_kill_9_during_save_leaves_a_loadable_old_or_new_checkpoint(tmp_path):
    folder = tmp_path / "adapter"
    models = [adapter(8, seed=3), adapter(16, seed=4)]
    x = token_batch()
    expected = [run(m, x) for m in models]
    models[0].save_pretrained(folder)
    rng = random.Random(20261202)
    durations = []
    for model in models * 2:  # how long one save takes on this machine now
        start = time.perf_counter()
        model.save_pretrained(folder)
        durations.append(time.perf_counter() - start)
    window = 4 * sorted(durations)[len(durations) // 2]
    seen = {"old or new": [0, 0], "interrupted": 0}
    kills = 0
    while kills < KILLS or (min(seen["old or new"]) < 2 or seen["interrupted"] < 2):
        assert kills < MAX_KILLS, f"{kills} kills never showed both checkpoints ({seen}, window {window:.3f} s)"
        if kills >= KILLS and kills % 10 == 0:
            window *= 1.5  # the child runs slower than the measured saves: reach further
        kills += 1
        models[0].save_pretrained(folder)  # each kill starts from the old checkpoint
        pid = os.fork()
        if pid == 0:  # the child: save, save, save ... until killed
            try:
                torch.set_num_threads(1)
                while True:
                    for model in (models[1], models[0]):
                        model.save_pretrained(folder)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.0, window))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the child died before the kill"
        entries = os.listdir(folder)
        seen["interrupted"] += any(e.startswith(gio.TMP_PREFIX) or e == gio.JOURNAL_NAME for e in entries)
        got = run(graftkit.PeftModel.from_pretrained(tiny_llama(), folder).eval(), x)
        matches = [torch.equal(got, want) for want in expected]
        assert any(matches), f"after a kill the folder ({sorted(entries)}) loads neither checkpoint"
        seen["old or new"][matches.index(True)] += 1
    models[1].save_pretrained(folder)  # the next save removes what killed saves left behind
    assert sorted(os.listdir(folder)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
