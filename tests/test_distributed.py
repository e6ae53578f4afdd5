"""DDP and FSDP2 (torchrun) and accelerate's DDP (accelerate launch), 2 CPU processes over gloo, train the same
adapter as one process on the same batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import graftkit
from tests.conftest import HUNG_AFTER_S, run, token_batch

pytestmark = pytest.mark.slow  # each test starts 2-process runs

SCRIPT = os.path.join(os.path.dirname(__file__), "distributed", "train_lora.py")
STEPS = "4"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(args, tmp_path):
    # Loopback only: gloo otherwise picks the interface the hostname resolves to, which can hang a sandbox.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}
    result = subprocess.run(args, capture_output=True, text=True, timeout=HUNG_AFTER_S, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    _run([sys.executable, SCRIPT, "single", str(out / "adapter"), STEPS], out)
    return out / "adapter"


def _launcher(mode: str) -> list[str]:
    port = str(_free_port())
    if mode == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines",
                "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", port]


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "accelerate"])
def test_two_process_training_matches_single_process(single, tmp_path, mode):
    _run([*_launcher(mode), SCRIPT, mode, str(tmp_path / "adapter"), STEPS], tmp_path)
    assert sorted(os.listdir(tmp_path / "adapter")) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    ours, reference = load_file(tmp_path / "adapter" / "adapter_model.safetensors"), load_file(
        single / "adapter_model.safetensors")
    assert set(ours) == set(reference)
    for key, tensor in reference.items():
        assert tensor.abs().sum() > 0, key  # trained: B moved off zero
        torch.testing.assert_close(ours[key], tensor, atol=1e-5, rtol=0, msg=key)
    # A normal adapter folder: it loads onto a fresh base.
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, initializer_range=0.2))
    loaded = graftkit.PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert run(loaded, token_batch()).isfinite().all()


@pytest.mark.skipif(tuple(int(p) for p in __import__("transformers").__version__.split(".")[:2]) < (5, 18),
                    reason="transformers < 5.18 loads a CPU DDP run's optimizer state with map_location='cpu:0', "
                           "which torch refuses; fixed in transformers 5.18")
def test_trainer_under_ddp_checkpoints_and_resumes(tmp_path):
    """graftkit.Trainer with 2 DDP processes: a run stopped after its first checkpoint and resumed logs the same
    losses as an uninterrupted run, and the checkpoints hold adapter files only."""
    import json

    script = os.path.join(os.path.dirname(__file__), "distributed", "trainer_resume.py")
    for mode, out in (("full", tmp_path / "full"), ("stop", tmp_path / "run"), ("resume", tmp_path / "run")):
        _run([*_launcher("ddp"), script, mode, str(out)], tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "run" / "checkpoint-3"))
    assert not any(name.startswith("model") for name in os.listdir(tmp_path / "run" / "checkpoint-3"))
    full = json.loads((tmp_path / "full" / "losses-full.json").read_text())
    resumed = json.loads((tmp_path / "run" / "losses-resume.json").read_text())
    later = {step: loss for step, loss in resumed.items() if int(step) > 3}
    assert sorted(later, key=int) == ["4", "5", "6"]
    for step, loss in later.items():
        assert abs(loss - full[step]) <= 1e-6, (step, loss, full[step])


def test_eva_gathers_every_process_rows(tmp_path):
    """EVA under 2 processes, each with half of every batch: with gather_distributed_inputs (the default) both
    arrive at the directions and ranks one process finds on the whole batches; without it they disagree."""
    script = os.path.join(os.path.dirname(__file__), "distributed", "eva_gather.py")
    _run([sys.executable, script, "single", str(tmp_path)], tmp_path)
    _run([*_launcher("ddp"), script, "ddp", str(tmp_path)], tmp_path)
    single = load_file(tmp_path / "eva-single-0.safetensors")
    first, second = load_file(tmp_path / "eva-ddp-0.safetensors"), load_file(tmp_path / "eva-ddp-1.safetensors")
    assert {k: v.shape for k, v in first.items()} == {k: v.shape for k, v in single.items()}
    for key, value in single.items():
        assert torch.equal(first[key], second[key]), key
        torch.testing.assert_close(first[key], value, atol=1e-4, rtol=0, msg=key)
    alone = [load_file(tmp_path / f"eva-local-{rank}.safetensors") for rank in (0, 1)]
    assert any(alone[0][k].shape != alone[1][k].shape or not torch.allclose(alone[0][k], alone[1][k], atol=1e-3)
               for k in alone[0])


@pytest.mark.parametrize("where", ["inside", "outside"])
def test_deepspeed_zero3_trains_and_saves_a_lora_adapter(tmp_path, where):
    """DeepSpeed ZeRO-3 (2 CPU processes, gloo) wraps a graftkit model whose base was built partitioned under
    zero.Init (and graftkit's own modules too, ``inside``), trains it, and the adapter every rank saves together is
    whole: reloaded on the gathered base it gives the engine's logits. Loading into partitioned models works too:
    the file onto a fresh partitioned base (written into partitions when built under zero.Init), tensors into the
    engine's partitions, and a second adapter into the trained engine."""
    pytest.importorskip("deepspeed")
    script = os.path.join(os.path.dirname(__file__), "distributed", "zero3_lora.py")
    _run([*_launcher("ddp"), script, str(tmp_path), "6", where], tmp_path)
    losses = json.loads((tmp_path / "result.json").read_text())["losses"]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    lora_b = saved["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert lora_b.shape == (16, 4) and lora_b.abs().max() > 0  # whole, and trained
    from transformers import LlamaConfig, LlamaForCausalLM

    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                        tie_word_embeddings=False))
    base.load_state_dict(load_file(tmp_path / "base.safetensors"))
    model = graftkit.PeftModel.from_pretrained(base.eval(), tmp_path / "adapter")
    batch = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=batch).logits
    seen = load_file(tmp_path / "logits.safetensors")
    torch.testing.assert_close(logits, seen["logits"], atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "result.json").read_text())["b_zero_at_start"]
    # Loaded into partitioned models: onto a fresh partitioned base, into the engine's partitions, a second time.
    torch.testing.assert_close(seen["reloaded"], seen["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(seen["again"], seen["logits"], atol=1e-5, rtol=0)
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(seen["base"], model(input_ids=batch).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(seen["zeroed"], seen["base"], atol=1e-5, rtol=0)
    assert (seen["logits"] - seen["base"]).abs().max() > 1e-3
