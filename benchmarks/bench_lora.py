"""graftkit vs HF peft vs the frozen-base floor, side by side in one process.

For each model the same base weights, LoRA config and inputs are used by every variant:

* ``floor``   : the base model with every weight frozen, forward + backward with gradients flowing to the
                activations (the input embeddings require grad). Any adapter method pays at least this.
* ``graftkit``: LoRA training step (forward + backward + AdamW step on the adapter).
* ``peft``    : the same step with HF peft (its defaults).

A QLoRA table compares the training step and its memory on the same NF4 4-bit base (bitsandbytes).
A last table times inference against the plain base model and peft: one adapter unmerged, mixed batches of 1, 4
and 16 distinct adapters (``adapter_names``), greedy generation, the adapter merged, and the merge itself.

Measured: training-step time, memory of a training step, unmerged inference latency (``no_grad`` forward)
against the plain base model. Repeats are interleaved across variants (ABCABC...) and the median is reported,
so drift in machine speed hits every variant alike.

Memory: on CUDA, the peak allocated during a step above what was allocated before it. On CPU there is no
allocator peak to read, so the table shows the bytes autograd saves for backward during the forward
(distinct storages, counted once, the model's own weights left out since they stay alive anyway) plus adapter
gradients and optimizer state: the part of a step's memory that a PEFT library controls.

Usage::

    python benchmarks/bench_lora.py                      # CPU: tiny Llama and SmolLM2-135M, fp32
    python benchmarks/bench_lora.py --models tiny-llama --repeats 5
    python benchmarks/bench_lora.py --device cuda --dtype bfloat16 --models llama-1b-geometry
"""

from __future__ import annotations

import argparse
import copy
import gc
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

import graftkit

warnings.filterwarnings("ignore")


# ---------------------------------------------------------------------------------------------- models
def build_model(name: str, device: str, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "tiny-llama":
        cfg = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
        model = LlamaForCausalLM(cfg)
    elif name == "llama-1b-geometry":  # Llama-3.2-1B shapes, random weights
        cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                          tie_word_embeddings=True)
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    elif name == "smollm2-135m":
        from graftkit.demo import default_model_dir

        model = AutoModelForCausalLM.from_pretrained(default_model_dir(log=lambda *_: None), dtype=torch.float32)
    else:
        raise SystemExit(f"unknown model {name!r}")
    return model.to(device=device, dtype=dtype).eval()


DEFAULT_SHAPES = {"tiny-llama": (4, 128), "smollm2-135m": (4, 128), "llama-1b-geometry": (4, 2048)}


# ---------------------------------------------------------------------------------------------- measuring
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def saved_bytes(fn: Callable[[], torch.Tensor], model: nn.Module) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs its forward, leaving out the
    model's own parameters and buffers (saving a reference to a live weight costs no memory)."""
    resident = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in resident:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


class Variant:
    def __init__(self, name: str, model: nn.Module, train: bool, floor: bool = False) -> None:
        self.name, self.model, self.floor = name, model, floor
        params = [p for p in model.parameters() if p.requires_grad]
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=1e-4) if (train and params) else None

    def loss(self, embeds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.floor:
            embeds = embeds.detach().requires_grad_(True)
        return self.model(inputs_embeds=embeds, labels=labels).loss

    def step(self, embeds: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss(embeds, labels).backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def memory(self, embeds: torch.Tensor, labels: torch.Tensor, device: str) -> float:
        """MiB: CUDA peak over the step; CPU: saved-for-backward + adapter grads + optimizer state."""
        if device == "cuda":
            self.step(embeds, labels)  # optimizer state exists before the measured step
            gc.collect()
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.step(embeds, labels)
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - before) / 2**20
        nbytes, loss = saved_bytes(lambda: self.loss(embeds, labels), self.model)
        loss.backward()
        state = sum(p.numel() * p.element_size() for p in self.params)
        extra = state * (3 if self.opt is not None else 0)  # grad + AdamW exp_avg + exp_avg_sq
        for p in self.params:
            p.grad = None
        return (nbytes + extra) / 2**20


def timed(fn: Callable[[], None], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1000


def interleaved(fns: dict[str, Callable[[], None]], device: str, warmup: int, repeats: int) -> dict[str, float]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            samples[key].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in samples.items()}


# ---------------------------------------------------------------------------------------------- one model
def bench_model(name: str, args: argparse.Namespace) -> list[tuple[str, str, float, float, float]]:
    rows = []
    for dropout in (float(d) for d in args.dropouts.split(",")):
        args.dropout = dropout
        rows += bench_train(name, args)
    return rows


def bench_train(name: str, args: argparse.Namespace) -> list[tuple[str, str, float, float, float]]:
    import peft

    dtype = getattr(torch, args.dtype)
    batch, seq = DEFAULT_SHAPES[name] if args.batch is None else (args.batch, args.seq)
    base = build_model(name, args.device, dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=g).to(args.device)
    with torch.no_grad():
        embeds = base.get_input_embeddings()(ids)
    lora_kwargs = dict(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout, target_modules="all-linear")

    floor_model = base
    for p in floor_model.parameters():
        p.requires_grad_(False)
    ours_model = graftkit.get_peft_model(copy.deepcopy(base), graftkit.LoraConfig(**lora_kwargs))
    theirs_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora_kwargs))
    with torch.no_grad():  # identical adapter weights: copy graftkit's init into peft
        theirs_sd = dict(theirs_model.named_parameters())
        for key, p in ours_model.named_parameters():
            if ".adapters.default." in key:
                other = key.replace(".adapters.default.lora_A.", ".lora_A.default.")
                other = other.replace(".adapters.default.lora_B.", ".lora_B.default.")
                theirs_sd[other].copy_(p)

    variants = {
        "floor": Variant("floor", floor_model, train=False, floor=True),
        "graftkit": Variant("graftkit", ours_model.train(), train=True),
        "peft": Variant("peft", theirs_model.train(), train=True),
    }
    if args.dropout == 0:
        with torch.no_grad():  # the two libraries compute the same loss (a sanity check, not a timing)
            a = variants["graftkit"].loss(embeds, ids).item()
            b = variants["peft"].loss(embeds, ids).item()
        assert abs(a - b) < 1e-3 * max(1.0, abs(b)), (a, b)

    rows: list[tuple[str, str, float, float, float]] = []
    train = interleaved({k: (lambda v=v: v.step(embeds, ids)) for k, v in variants.items()},
                        args.device, args.warmup, args.repeats)
    tag = f", dropout {args.dropout:g}"
    rows.append((name, "train step (ms)" + tag, train["graftkit"], train["peft"], train["floor"]))
    mem = {k: v.memory(embeds, ids, args.device) for k, v in variants.items()}
    rows.append((name, "step memory (MiB)" + tag, mem["graftkit"], mem["peft"], mem["floor"]))

    for v in variants.values():
        v.model.eval()

    def infer(m: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                m(inputs_embeds=embeds)
        return run

    latency = interleaved({"graftkit": infer(ours_model), "peft": infer(theirs_model), "base": infer(floor_model)},
                          args.device, args.warmup, args.repeats)
    rows.append((name, "unmerged inference (ms)" + tag, latency["graftkit"], latency["peft"], latency["base"]))
    del variants, ours_model, theirs_model, base
    gc.collect()
    return rows


def _copy_adapters_into_peft(ours: nn.Module, theirs: nn.Module) -> None:
    """Give the peft model graftkit's adapter weights (every adapter name), so both compute the same thing."""
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for key, p in ours.named_parameters():
            if ".adapters." not in key:
                continue
            head, rest = key.split(".adapters.", 1)
            adapter, ab, tail = rest.split(".", 2)
            theirs_params[f"{head}.{ab}.{adapter}.{tail}"].copy_(p)


def bench_inference(name: str, args: argparse.Namespace) -> list[tuple[str, str, float, float, float]]:
    """Inference against the base model and peft, 16 rows: one adapter unmerged; mixed batches (``adapter_names``)
    of 1, 4 and 16 distinct adapters; greedy generation of 16 tokens; the adapter merged; and the time to merge."""
    import peft

    dtype = getattr(torch, args.dtype)
    _, seq = DEFAULT_SHAPES[name] if args.batch is None else (args.batch, args.seq)
    rows = 16
    base = build_model(name, args.device, dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, base.config.vocab_size, (rows, seq), generator=g).to(args.device)
    kwargs = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", init_lora_weights=False)
    adapters = [f"a{i}" for i in range(16)]
    ours = graftkit.get_peft_model(copy.deepcopy(base), graftkit.LoraConfig(**kwargs), adapter_name=adapters[0])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs), adapter_name=adapters[0])
    for a in adapters[1:]:
        ours.add_adapter(a, graftkit.LoraConfig(**kwargs))
        theirs.add_adapter(a, peft.LoraConfig(**kwargs))
    _copy_adapters_into_peft(ours, theirs)
    for m in (ours, theirs, base):
        m.eval()
    mixed = {k: [adapters[i % k] for i in range(rows)] for k in (1, 4, 16)}
    with torch.no_grad():  # sanity: same numbers
        a = ours(input_ids=ids, adapter_names=mixed[16]).logits
        b = theirs(input_ids=ids, adapter_names=mixed[16]).logits
    assert (a - b).abs().max().item() < 1e-3 * max(1.0, b.abs().max().item())

    def call(m: nn.Module, **kw) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                m(input_ids=ids, **kw)
        return run

    def generate(m: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                m.generate(input_ids=ids[:, :32], attention_mask=torch.ones_like(ids[:, :32]), max_new_tokens=16,
                           min_new_tokens=16, do_sample=False, pad_token_id=0)
        return run

    def timed_rows(label: str, ours_fn, theirs_fn, base_fn) -> tuple[str, str, float, float, float]:
        t = interleaved({"graftkit": ours_fn, "peft": theirs_fn, "base": base_fn}, args.device, args.warmup,
                        args.repeats)
        return (name, label, t["graftkit"], t["peft"], t["base"])

    out = [timed_rows("unmerged, 1 adapter (ms)", call(ours), call(theirs), call(base))]
    for k in (1, 4, 16):
        out.append(timed_rows(f"mixed, {k} adapter(s) (ms)", call(ours, adapter_names=mixed[k]),
                              call(theirs, adapter_names=mixed[k]), call(base)))
    out.append(timed_rows("generate 16 tokens (ms)", generate(ours), generate(theirs), generate(base)))
    merge_ms = {"graftkit": [], "peft": []}
    for _ in range(args.repeats):
        for key, m in (("graftkit", ours), ("peft", theirs)):
            merge_ms[key].append(timed(m.merge_adapter, args.device))
            m.unmerge_adapter()
    ours.merge_adapter()
    theirs.merge_adapter()
    out.append(timed_rows("merged (ms)", call(ours), call(theirs), call(base)))
    merge = {k: statistics.median(v) for k, v in merge_ms.items()}
    out.append((name, "merge_adapter time (ms)", merge["graftkit"], merge["peft"], float("nan")))
    del ours, theirs, base
    gc.collect()
    return out


def bench_qlora(name: str, args: argparse.Namespace) -> list[tuple[str, str, float, float, float]]:
    """QLoRA: the LoRA training step and its memory on the same NF4 (double-quantized) base, graftkit vs peft.

    The base is written once to a temporary folder and loaded twice through transformers'
    ``BitsAndBytesConfig``, so both libraries train on identical quantized weights."""
    import tempfile

    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    batch, seq = DEFAULT_SHAPES[name] if args.batch is None else (args.batch, args.seq)
    with tempfile.TemporaryDirectory() as folder:
        build_model(name, "cpu", torch.float32).save_pretrained(folder)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=getattr(torch, args.dtype))

        def load() -> nn.Module:
            return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, device_map=args.device)

        kwargs = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear")
        ours = graftkit.get_peft_model(graftkit.prepare_model_for_kbit_training(load(), False),
                                       graftkit.LoraConfig(**kwargs))
        theirs = peft.get_peft_model(peft.prepare_model_for_kbit_training(load(), False), peft.LoraConfig(**kwargs))
    _copy_adapters_into_peft(ours, theirs)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ours.config.vocab_size, (batch, seq), generator=g).to(args.device)
    with torch.no_grad():
        embeds = ours.get_input_embeddings()(ids)
    variants = {"graftkit": Variant("graftkit", ours.train(), train=True),
                "peft": Variant("peft", theirs.train(), train=True)}
    step = interleaved({k: (lambda v=v: v.step(embeds, ids)) for k, v in variants.items()},
                       args.device, args.warmup, args.repeats)
    mem = {k: v.memory(embeds, ids, args.device) for k, v in variants.items()}
    del variants, ours, theirs
    gc.collect()
    return [(name, "QLoRA nf4 train step (ms)", step["graftkit"], step["peft"], step["peft"]),
            (name, "QLoRA step memory (MiB)", mem["graftkit"], mem["peft"], mem["peft"])]


def print_table(rows: list[tuple[str, str, float, float, float]], reference: str | None) -> None:
    """A markdown table; with ``reference=None`` the reference columns are left out."""
    ref_head = f" {reference:>10} |" if reference else ""
    ref_ratio = f" {'graftkit/' + reference:>16} |" if reference else ""
    header = (f"| {'model':<14} | {'metric':<38} | {'graftkit':>9} | {'peft':>9} |{ref_head} {'graftkit/peft':>13} |"
              f"{ref_ratio}")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for model, metric, ours, theirs, ref in rows:
        ref_cells = f" {ref:>10.1f} |" if reference else ""
        ref_cells_ratio = f" {ours / ref:>16.3f} |" if reference else ""
        print(f"| {model:<14} | {metric:<38} | {ours:>9.1f} | {theirs:>9.1f} |{ref_cells} {ours / theirs:>13.3f} |"
              f"{ref_cells_ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--models", default="tiny-llama,smollm2-135m")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropouts", default="0,0.05", help="LoRA dropouts for the training table")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: all cores)")
    parser.add_argument("--suite", default="all", choices=["all", "train", "inference", "qlora"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import peft

    print(f"graftkit {graftkit.__version__} | peft {peft.__version__} | torch {torch.__version__} | "
          f"{args.device} {args.dtype} | {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads | LoRA r={args.rank} all-linear")
    names = [n.strip() for n in args.models.split(",")]
    suites = [
        ("train", bench_model, "Training (floor: frozen base, forward + backward to the activations; "
                               "inference row: plain base)", "floor"),
        ("qlora", bench_qlora, "QLoRA on a 4-bit NF4 base", None),
        ("inference", bench_inference, "Inference, 16 rows (base: the plain base model; merge time has none)",
         "base"),
    ]
    for key, bench, title, reference in suites:
        if args.suite in ("all", key):
            rows = [row for name in names for row in bench(name, args)]
            print("\n" + title)
            print_table(rows, reference)
            if key == "inference":
                for name in names:
                    by = {metric: (ours, theirs) for model, metric, ours, theirs, _ in rows if model == name}
                    single, mixed16 = by["unmerged, 1 adapter (ms)"], by["mixed, 16 adapter(s) (ms)"]
                    print(f"{name}: mixed batch of 16 adapters / single-adapter prefill: graftkit "
                          f"{mixed16[0] / single[0]:.3f}, peft {mixed16[1] / single[1]:.3f}")


if __name__ == "__main__":
    main()
