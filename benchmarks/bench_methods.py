"""Training steps of IA3, AdaLoRA and Llama-Adapter: graftkit vs HF peft on the same model, in one process.

For each method both libraries get the same base weights and the same adapter values (graftkit's adapter is saved
and loaded into HF peft, trainable); each step is forward + backward + AdamW step (+ ``update_and_allocate`` for
AdaLoRA, which prunes ranks on every step of its budget phase). Before timing, the first step's losses are
compared: a fast wrong answer is not a result. Repeats are interleaved across the two libraries and the median
step time is reported with the ratio graftkit / peft (below 1: graftkit is faster).

``moe_lora`` is LoRA "all-linear" on a small random Mixtral (attention, router and the fused expert weights), with
8 experts; ``moe_lora_64e`` the same with 64 experts (top 2 of them per token, as before): the tokens each expert
sees shrink, the expert weights grow eightfold.

Usage::

    python benchmarks/bench_methods.py                  # SmolLM2-135M-Instruct, CPU, fp32, batch 4 x 128 tokens
    python benchmarks/bench_methods.py --repeats 3 --methods ia3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
import warnings

import torch

import graftkit

warnings.filterwarnings("ignore")

CONFIGS = {
    "ia3": ("IA3Config", dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "adalora": ("AdaLoraConfig", dict(init_r=12, target_r=4, total_step=1000, lora_alpha=32,
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    "adaption_prompt": ("AdaptionPromptConfig", dict(adapter_len=10, adapter_layers=30)),
    # LoRA on a mixture-of-experts model: attention, router and the fused 3-D expert weights ("all-linear")
    "moe_lora": ("LoraConfig", dict(r=8, lora_alpha=16, target_modules="all-linear")),
    "moe_lora_64e": ("LoraConfig", dict(r=8, lora_alpha=16, target_modules="all-linear")),
}


def load_base(device: str):
    from transformers import AutoModelForCausalLM

    from graftkit.demo import default_model_dir

    path = default_model_dir(log=lambda *_: None)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)


def tiny_mixtral(device: str, experts: int = 8):
    """A small Mixtral geometry with random weights (no MoE model installs offline): 4 layers, top 2 experts."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=2, num_local_experts=experts,
                           num_experts_per_tok=2)
    return MixtralForCausalLM(config).to(device)


BASES = {"moe_lora": tiny_mixtral, "moe_lora_64e": lambda device: tiny_mixtral(device, 64)}


def pair(method: str, device: str):
    """(graftkit model, HF peft model) with the same adapter values, both in train mode."""
    import peft

    name, kwargs = CONFIGS[method]
    torch.manual_seed(0)
    base = BASES.get(method, load_base)
    ours = graftkit.get_peft_model(base(device), getattr(graftkit, name)(task_type="CAUSAL_LM", **kwargs))
    with torch.no_grad():  # non-trivial starting values (IA3 ones, AdaLoRA's zero singular values, closed gates)
        for param_name, param in ours.named_parameters():
            if param.requires_grad and ("ia3_l" in param_name or "lora_E" in param_name or "adaption_gate" in param_name
                                        or "lora_B" in param_name):
                param.add_(0.1)
    with tempfile.TemporaryDirectory() as folder:
        ours.save_pretrained(folder)
        theirs = peft.PeftModel.from_pretrained(base(device), folder, is_trainable=True)
    return ours.train(), theirs.train()


class Stepper:
    def __init__(self, model, allocate) -> None:
        self.model = model
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        self.allocate = allocate
        self.step = 0

    def __call__(self, batch: torch.Tensor) -> float:
        loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        self.opt.step()
        if self.allocate is not None:
            self.allocate(self.step)
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    print(f"# training step, SmolLM2-135M-Instruct fp32 (moe_lora: a random 4-layer Mixtral, 8 or 64 experts), batch "
          f"{args.batch} x {args.length} tokens, {args.device}, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print("| method | graftkit (ms) | peft (ms) | graftkit / peft | first-step losses equal |")
    print("|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 49152, (args.batch, args.length), generator=g).to(args.device)
    for method in args.methods:
        ours, theirs = pair(method, args.device)
        allocate = method == "adalora"
        steppers = {
            "graftkit": Stepper(ours, ours.update_and_allocate if allocate else None),
            "peft": Stepper(theirs, theirs.base_model.update_and_allocate if allocate else None),
        }
        first = {name: stepper(batch) for name, stepper in steppers.items()}  # also the warm-up step
        same = abs(first["graftkit"] - first["peft"]) <= 1e-4 * abs(first["peft"])
        times: dict[str, list[float]] = {name: [] for name in steppers}
        for _ in range(args.repeats):
            for name, stepper in steppers.items():
                start = time.perf_counter()
                stepper(batch)
                times[name].append(time.perf_counter() - start)
        ms = {name: 1000 * statistics.median(values) for name, values in times.items()}
        print(f"| {method} | {ms['graftkit']:.0f} | {ms['peft']:.0f} | {ms['graftkit'] / ms['peft']:.2f} | "
              f"{'yes' if same else 'NO: ' + str(first)} |", flush=True)
        del ours, theirs, steppers


if __name__ == "__main__":
    main()
