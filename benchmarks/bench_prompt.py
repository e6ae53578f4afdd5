"""Greedy generation with prompt methods: graftkit vs HF peft vs the plain base model, in one process.

For each method (prompt tuning, prefix tuning) graftkit and HF peft get the same base weights, the same adapter
values (20 virtual tokens) and the same prompt; each variant generates 32 new tokens greedily. Repeats are
interleaved across variants and the median is reported. Before timing, the script checks what each variant
generates against greedy decoding by full forward passes without a cache (graftkit's reference) and prints
whether it matches: a fast wrong answer is not a result.

Usage::

    python benchmarks/bench_prompt.py                 # SmolLM2-135M-Instruct, CPU, fp32, batch 1 and 4
    python benchmarks/bench_prompt.py --repeats 3 --batches 1
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import torch

import graftkit

warnings.filterwarnings("ignore")
NEW_TOKENS = 32


def load_base():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from graftkit.demo import default_model_dir

    path = default_model_dir(log=lambda *_: None)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def variants(method: str, base_fn):
    import peft

    name = {"prompt tuning": "PromptTuningConfig", "prefix tuning": "PrefixTuningConfig"}[method]
    kwargs = {"num_virtual_tokens": 20, "task_type": "CAUSAL_LM"}
    torch.manual_seed(0)
    ours = graftkit.get_peft_model(base_fn(), getattr(graftkit, name)(**kwargs)).eval()
    with torch.no_grad():  # a prompt of the scale of real token embeddings
        ours.prompt_encoder["default"].embedding.weight.mul_(0.1)
    theirs = peft.get_peft_model(base_fn(), getattr(peft, name)(**kwargs)).eval()
    theirs.prompt_encoder["default"].load_state_dict(ours.prompt_encoder["default"].state_dict())
    return {"base": base_fn(), "graftkit": ours, "peft": theirs}


def greedy_without_cache(model, ids, mask, steps, eos):
    """Greedy decoding by full forward passes, the end-of-sequence token excluded (as ``min_new_tokens`` does)."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        logits[:, eos] = -float("inf")
        token = logits.argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", default="1,4")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    base, tokenizer = load_base()
    state = {k: v.clone() for k, v in base.state_dict().items()}

    def base_fn():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(base.config)
        model.load_state_dict(state)
        return model.eval()

    text = "What is the capital of France? Answer in one sentence."
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"graftkit {graftkit.__version__}; greedy generation of {NEW_TOKENS} tokens, SmolLM2-135M-Instruct fp32\n")
    print("| method | batch | base (ms) | graftkit (ms) | peft (ms) | graftkit / peft | graftkit right | peft right |")
    print("|---|---|---|---|---|---|---|---|")
    for method in ("prompt tuning", "prefix tuning"):
        models = variants(method, base_fn)
        for batch in [int(b) for b in args.batches.split(",")]:
            enc = tokenizer([text] * batch, return_tensors="pt")
            ids, mask = enc["input_ids"], enc["attention_mask"]
            def run(model, new_tokens, least=0, ids=ids, mask=mask):
                return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      min_new_tokens=least, do_sample=False, pad_token_id=tokenizer.eos_token_id)

            gen = {k: (lambda m=m: run(m, NEW_TOKENS, NEW_TOKENS)) for k, m in models.items()}
            reference = greedy_without_cache(models["graftkit"], ids, mask, 8, tokenizer.eos_token_id)
            right = {k: torch.equal(run(models[k], 8, 8), reference) for k in ("graftkit", "peft")}
            samples = {k: [] for k in gen}
            for k in gen:  # warm-up
                gen[k]()
            for _ in range(args.repeats):
                for k, fn in gen.items():
                    start = time.perf_counter()
                    fn()
                    samples[k].append((time.perf_counter() - start) * 1000)
            ms = {k: statistics.median(v) for k, v in samples.items()}
            print(f"| {method} | {batch} | {ms['base']:.0f} | {ms['graftkit']:.0f} | {ms['peft']:.0f} | "
                  f"{ms['graftkit'] / ms['peft']:.2f} | {'yes' if right['graftkit'] else 'NO'} | "
                  f"{'yes' if right['peft'] else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
