"""graftkit.Trainer checkpoints are complete or absent, and resuming finds the newest complete one.

A save cut short (a failing write here; SIGKILL in the slow test) must leave no ``checkpoint-N``; a partial folder
written by something else is skipped by ``resume_from_checkpoint=True`` (and named), refused when named directly.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import graftkit
from graftkit.integrations.trainer import STAGING_DIR, checkpoint_problem, newest_complete_checkpoint
from tests.conftest import HUNG_AFTER_S
from tests.test_trainer import arguments, lora, losses, rows, tied_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trainer(path, max_steps: int = 8, save_steps: int = 2, **kwargs) -> graftkit.Trainer:
    model = graftkit.get_peft_model(tied_llama(), lora(lora_dropout=0.1))
    args = arguments(path, max_steps=max_steps, save_steps=save_steps, lr_scheduler_type="linear", warmup_steps=2,
                     **kwargs)
    return graftkit.Trainer(model=model, args=args, train_dataset=rows())


def test_a_checkpoint_whose_save_fails_is_absent_and_the_run_says_why(tmp_path, monkeypatch):
    run = trainer(tmp_path, max_steps=8)
    real = type(run)._save_rng_state
    calls = {"n": 0}

    def full_disk_on_the_second_checkpoint(self, output_dir):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(self, output_dir)

    monkeypatch.setattr(type(run), "_save_rng_state", full_disk_on_the_second_checkpoint)
    with pytest.raises(graftkit.SaveError, match=f"cannot write checkpoint-4 in {tmp_path}: .*No space left") as err:
        run.train()
    assert isinstance(err.value, OSError)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]  # no partial checkpoint-4, no staging left
    monkeypatch.undo()
    resumed = trainer(tmp_path, max_steps=8)
    resumed.train(resume_from_checkpoint=True)
    assert sorted(losses(resumed)) == list(range(1, 9))  # steps 1-2 from the checkpoint's state, 3-8 trained


def test_resume_skips_a_partial_checkpoint_and_names_it(tmp_path, caplog):
    full = trainer(tmp_path / "full")
    full.train()
    run = trainer(tmp_path / "run")
    run.train()
    # What a tool without staging leaves when killed during checkpoint-8: adapter written, state not.
    os.remove(tmp_path / "run" / "checkpoint-8" / "trainer_state.json")
    with open(tmp_path / "run" / "checkpoint-6" / "trainer_state.json", "a", encoding="utf-8") as fh:
        fh.write("")  # checkpoint-6 stays complete
    os.remove(tmp_path / "run" / "checkpoint-4" / "optimizer.pt")  # older and incomplete: not reached
    with pytest.raises(graftkit.CheckpointError, match="checkpoint-8: it has no trainer_state.json"):
        trainer(tmp_path / "run").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-8"))
    with pytest.raises(graftkit.CheckpointError, match="no optimizer.pt"):
        trainer(tmp_path / "run").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    resumed = trainer(tmp_path / "run")
    with caplog.at_level("WARNING", logger="graftkit"):
        resumed.train(resume_from_checkpoint=True)
    assert "resuming from checkpoint-6" in caplog.text and "checkpoint-8 (it has no trainer_state.json" in caplog.text
    expected = losses(full)
    got = {step: loss for step, loss in losses(resumed).items() if step > 6}
    assert sorted(got) == [7, 8]
    for step in got:
        assert abs(got[step] - expected[step]) <= 1e-6, (step, got[step], expected[step])
    # a damaged state file counts as incomplete too
    (tmp_path / "run" / "checkpoint-8" / "trainer_state.json").write_text('{"global_st')
    (tmp_path / "run" / "checkpoint-6" / "trainer_state.json").write_text('[]')
    os.remove(tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors")
    named = "no complete checkpoint .*checkpoint-8: .*damaged.*checkpoint-6.*checkpoint-2: it has no complete adapter"
    with pytest.raises(graftkit.CheckpointError, match=named):
        trainer(tmp_path / "run").train(resume_from_checkpoint=True)


def test_the_best_checkpoint_recorded_in_the_state_is_the_final_folder(tmp_path):
    model = graftkit.get_peft_model(tied_llama(), lora())
    args = arguments(tmp_path, max_steps=4, save_steps=2, eval_strategy="steps", eval_steps=2,
                     metric_for_best_model="loss", load_best_model_at_end=True, save_total_limit=1)
    run = graftkit.Trainer(model=model, args=args, train_dataset=rows(), eval_dataset=rows(8, seed=2))
    run.train()
    best = run.state.best_model_checkpoint
    assert best is not None and os.path.dirname(best) == str(tmp_path) and os.path.isdir(best)
    for folder in os.listdir(tmp_path):
        state = json.loads((tmp_path / folder / "trainer_state.json").read_text())
        assert STAGING_DIR not in (state["best_model_checkpoint"] or ""), folder
    assert STAGING_DIR not in os.listdir(tmp_path)


CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from tests.test_trainer_checkpoints import trainer
    run = trainer({path!r}, max_steps=5000, save_steps=1, save_total_limit=2)
    print("training", flush=True)
    run.train(resume_from_checkpoint=sys.argv[1] == "resume" or None)
""")


@pytest.mark.slow
def test_killed_during_checkpointing_the_run_always_resumes(tmp_path):
    """SIGKILL at random moments of a run that checkpoints every step (a checkpoint is being written most of the
    time): each time the run folder holds only complete checkpoints, and the next run resumes from it."""
    rng = random.Random(23)
    child = CHILD.format(root=ROOT, path=str(tmp_path))

    def checkpoints() -> list[str]:
        return [d for d in os.listdir(tmp_path) if d.startswith("checkpoint-")]

    logs = tmp_path.parent / f"{tmp_path.name}-logs"
    logs.mkdir()
    for kill in range(12):
        # The child's output goes to files, never to a pipe nobody drains (a full pipe would stall the child).
        with open(logs / f"{kill}.out", "w") as out, open(logs / f"{kill}.err", "w") as err:
            proc = subprocess.Popen([sys.executable, "-c", child, "resume" if kill else "new"], stdout=out,
                                    stderr=err, text=True)

        def errors() -> str:
            return (logs / f"{kill}.err").read_text()[-3000:]  # noqa: B023 - read while this child runs

        while not checkpoints() or "training" not in (logs / f"{kill}.out").read_text():
            assert proc.poll() is None, errors()
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=HUNG_AFTER_S)
        assert proc.returncode == -signal.SIGKILL, errors()  # killed mid-run, not finished or failed
        for name in checkpoints():
            assert checkpoint_problem(str(tmp_path / name), ["default"]) is None, (kill, name)
    newest = newest_complete_checkpoint(str(tmp_path))
    step = int(newest.rsplit("-", 1)[1])
    resumed = trainer(tmp_path, max_steps=step + 1, save_steps=1)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == step + 1


def test_a_checkpoint_moved_aside_by_a_killed_save_comes_back(tmp_path):
    """Killed between moving the old copy of a step aside and moving the new one in: the next save restores it."""
    run = trainer(tmp_path, max_steps=4)
    run.train()
    staging = tmp_path / STAGING_DIR
    staging.mkdir()
    os.replace(tmp_path / "checkpoint-4", staging / "replaced-checkpoint-4")
    again = trainer(tmp_path, max_steps=3, save_steps=3)  # its one save (step 3) clears the staging first
    again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    assert checkpoint_problem(str(tmp_path / "checkpoint-4")) is None
    assert json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4


class Killed(BaseException):
    """Stands for SIGKILL arriving inside a deletion (a BaseException: nothing catches it on the way out)."""


def test_killed_while_dropping_an_old_checkpoint_leaves_only_complete_ones(tmp_path, monkeypatch):
    """save_total_limit drops old checkpoints; a run killed halfway through deleting one must not leave it behind
    half deleted among the complete ones (it is moved aside first)."""
    import shutil

    import graftkit.integrations.trainer as module

    real = shutil.rmtree

    def cut_short(path, *args, **kwargs):
        if os.path.basename(str(path)).startswith(("checkpoint-", "deleted-checkpoint-")):  # dropping one
            os.remove(os.path.join(path, "adapter_model.safetensors"))
            raise Killed
        return real(path, *args, **kwargs)

    monkeypatch.setattr(module.shutil, "rmtree", cut_short)
    with pytest.raises(Killed):
        trainer(tmp_path, max_steps=8, save_steps=2, save_total_limit=1).train()
    monkeypatch.setattr(module.shutil, "rmtree", real)
    found = [d for d in os.listdir(tmp_path) if d.startswith("checkpoint-")]
    assert found and all(checkpoint_problem(str(tmp_path / d)) is None for d in found), found
    resumed = trainer(tmp_path, max_steps=8, save_steps=2, save_total_limit=1)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 8
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-8"]  # the staging folder went with the next save
