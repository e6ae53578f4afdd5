"""graftkit vs HF peft vs the frozen-base floor, side by side in one process.

For each model the same base weights, LoRA config, adapter weights and inputs are used by every variant:

* ``floor``    : the base model with every weight frozen, forward + backward with gradients flowing to the
                 activations (the input embeddings require grad). Any adapter method pays at least this.
* ``base``     : the plain base model, ``no_grad`` (the inference reference).
* ``graftkit`` : graftkit's LoRA (training: forward + backward + AdamW step on the adapter).
* ``peft``     : the same with HF peft's defaults (adapters in fp32 over a half-precision base).
* ``peft-bf16``: HF peft with ``autocast_adapter_dtype=False`` (adapters in the base dtype); only on
                 half-precision runs, since on fp32 it is the same model as ``peft``.

Tables: training step and its memory with LoRA dropout 0 and 0.05; QLoRA on the same NF4 base; inference
(16 rows): unmerged prefill, one decode step ((generate 17 tokens - generate 1) / 16), mixed batches of 1, 4
and 16 distinct adapters (``adapter_names``), the adapter merged, ``merge_adapter`` with 16 adapters loaded, and
``merge_and_unload``. The last lines check the performance issue's targets (GPU targets on ``cuda``, the
graftkit/peft training target on CPU). Repeats are interleaved across variants (ABCABC...) and the median is
reported, so drift in machine speed hits every variant alike.

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


# (batch, tokens per row): training as in the performance issue; inference runs 16 rows (one per adapter).
TRAIN_SHAPES = {"tiny-llama": (4, 128), "smollm2-135m": (4, 128), "llama-1b-geometry": (4, 2048)}
INFER_SHAPES = {"tiny-llama": (16, 128), "smollm2-135m": (16, 128), "llama-1b-geometry": (16, 512)}


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


# ---------------------------------------------------------------------------------------------- variants
Row = tuple[str, str, dict[str, float]]  # model, metric, value per column


def half(args: argparse.Namespace) -> bool:
    return args.dtype in ("bfloat16", "float16")


def peft_variants(args: argparse.Namespace) -> list[tuple[str, bool]]:
    """(column, autocast_adapter_dtype): peft's defaults, and on half-precision bases also peft with adapters in
    the base dtype. On an fp32 base the two are the same model, so the second column is left out."""
    return [("peft", True)] + ([("peft-bf16", False)] if half(args) else [])


def make_peft(base: nn.Module, config_kwargs: dict, autocast: bool, adapter_name: str = "default") -> nn.Module:
    import peft

    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config_kwargs), adapter_name=adapter_name,
                               autocast_adapter_dtype=autocast)


def _copy_adapters_into_peft(ours: nn.Module, theirs: nn.Module) -> None:
    """Give the peft model graftkit's adapter weights (every adapter name), so both compute the same thing."""
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():  # the in-memory names are the same in both libraries
        for key, p in ours.named_parameters():
            if ".lora_" in key:
                theirs_params[key].copy_(p)


def _same_output(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """A sanity check that two variants compute the same thing (not a timing): relative to the output scale."""
    err = (a.float() - b.float()).abs().max().item()
    scale = max(1.0, b.float().abs().max().item())
    tol = 5e-2 if a.dtype in (torch.bfloat16, torch.float16) else 1e-3
    assert err <= tol * scale, f"{what}: outputs differ by {err:g} (scale {scale:g})"


# ---------------------------------------------------------------------------------------------- training
def bench_train(name: str, args: argparse.Namespace) -> list[Row]:
    """Training step and its memory for each LoRA dropout in ``--dropouts``."""
    rows: list[Row] = []
    for dropout in (float(d) for d in args.dropouts.split(",")):
        rows += _bench_train_one(name, args, dropout)
    return rows


def _bench_train_one(name: str, args: argparse.Namespace, dropout: float) -> list[Row]:
    dtype = getattr(torch, args.dtype)
    batch, seq = TRAIN_SHAPES[name] if args.batch is None else (args.batch, args.seq)
    base = build_model(name, args.device, dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=g).to(args.device)
    with torch.no_grad():
        embeds = base.get_input_embeddings()(ids)
    lora_kwargs = dict(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=dropout, target_modules="all-linear")
    for p in base.parameters():
        p.requires_grad_(False)

    ours = graftkit.get_peft_model(copy.deepcopy(base), graftkit.LoraConfig(**lora_kwargs))
    models = {"graftkit": ours}
    for column, autocast in peft_variants(args):
        models[column] = make_peft(base, lora_kwargs, autocast)
        _copy_adapters_into_peft(ours, models[column])  # identical adapter weights
    variants = {k: Variant(k, m.train(), train=True) for k, m in models.items()}
    variants["floor"] = Variant("floor", base, train=False, floor=True)
    if dropout == 0:
        with torch.no_grad():
            ref = variants["graftkit"].loss(embeds, ids)
            for column, _ in peft_variants(args):
                _same_output(ref, variants[column].loss(embeds, ids), f"{name} loss, graftkit vs {column}")

    train = interleaved({k: (lambda v=v: v.step(embeds, ids)) for k, v in variants.items()},
                        args.device, args.warmup, args.repeats)
    mem = {k: v.memory(embeds, ids, args.device) for k, v in variants.items()}
    del variants, models, ours, base
    gc.collect()
    tag = f", dropout {dropout:g}"
    return [(name, "train step (ms)" + tag, train), (name, "step memory (MiB)" + tag, mem)]


# ---------------------------------------------------------------------------------------------- inference
def bench_inference(name: str, args: argparse.Namespace) -> list[Row]:
    """16 rows against the plain base model: one adapter unmerged (prefill); one decode step; mixed batches
    (``adapter_names``) of 1, 4 and 16 distinct adapters; the adapter merged; ``merge_adapter`` with 16 adapters
    loaded, and ``merge_and_unload`` of one adapter."""
    import peft

    dtype = getattr(torch, args.dtype)
    rows, seq = INFER_SHAPES[name]
    base = build_model(name, args.device, dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, base.config.vocab_size, (rows, seq), generator=g).to(args.device)
    kwargs = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", init_lora_weights=False)
    adapters = [f"a{i}" for i in range(16)]
    ours = graftkit.get_peft_model(copy.deepcopy(base), graftkit.LoraConfig(**kwargs), adapter_name=adapters[0])
    for a in adapters[1:]:
        ours.add_adapter(a, graftkit.LoraConfig(**kwargs))
    models: dict[str, nn.Module] = {"graftkit": ours}
    for column, autocast in peft_variants(args):
        theirs = make_peft(base, kwargs, autocast, adapter_name=adapters[0])
        for a in adapters[1:]:
            theirs.add_adapter(a, peft.LoraConfig(**kwargs), autocast_adapter_dtype=autocast)
        _copy_adapters_into_peft(ours, theirs)
        models[column] = theirs
    models["base"] = base
    for m in models.values():
        m.eval()
    mixed = {k: [adapters[i % k] for i in range(rows)] for k in (1, 4, 16)}
    with torch.no_grad():
        ref = ours(input_ids=ids, adapter_names=mixed[16]).logits
        for column, _ in peft_variants(args):
            _same_output(ref, models[column](input_ids=ids, adapter_names=mixed[16]).logits, f"{name} mixed batch")

    def call(m: nn.Module, **kw) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                m(input_ids=ids, **kw)
        return run

    def generate(m: nn.Module, new_tokens: int) -> Callable[[], None]:
        prompt = ids[:, :32]

        def run() -> None:
            with torch.no_grad():
                m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return run

    def timed_row(label: str, make: Callable[[nn.Module], Callable[[], None]], **only) -> Row:
        fns = {k: make(m, **(only if k != "base" else {})) for k, m in models.items()}
        return (name, label, interleaved(fns, args.device, args.warmup, args.repeats))

    out = [timed_row("unmerged prefill, 1 adapter (ms)", call)]
    # One decode step: (generate 1 + 16 tokens - generate 1 token) / 16, i.e. the prompt's prefill taken out.
    long = timed_row("generate", lambda m: generate(m, 17))[2]
    short = timed_row("generate", lambda m: generate(m, 1))[2]
    out.append((name, "decode step, 1 adapter (ms)", {k: (long[k] - short[k]) / 16 for k in long}))
    for k in (1, 4, 16):
        out.append(timed_row(f"mixed, {k} adapter(s) (ms)", call, adapter_names=mixed[k]))
    merge_ms: dict[str, list[float]] = {k: [] for k in models if k != "base"}
    for _ in range(args.repeats):
        for key in merge_ms:
            merge_ms[key].append(timed(models[key].merge_adapter, args.device))
            models[key].unmerge_adapter()
    for key in merge_ms:
        models[key].merge_adapter()
    out.append(timed_row("merged (ms)", call))
    out.append((name, "merge_adapter, 16 loaded (ms)", {k: statistics.median(v) for k, v in merge_ms.items()}))
    out.append((name, "merge_and_unload, 1 adapter (ms)", _merge_and_unload_ms(base, kwargs, args)))
    models.clear()
    del ours, base
    gc.collect()
    return out


def _merge_and_unload_ms(base: nn.Module, kwargs: dict, args: argparse.Namespace) -> dict[str, float]:
    """``merge_and_unload`` on a fresh single-adapter model each time (it is destructive); copies not timed."""
    samples: dict[str, list[float]] = {"graftkit": [], **{c: [] for c, _ in peft_variants(args)}}
    for _ in range(args.repeats):
        for column in samples:
            if column == "graftkit":
                model = graftkit.get_peft_model(copy.deepcopy(base), graftkit.LoraConfig(**kwargs))
            else:
                model = make_peft(base, kwargs, dict(peft_variants(args))[column])
            samples[column].append(timed(model.merge_and_unload, args.device))
            del model
            gc.collect()
    return {k: statistics.median(v) for k, v in samples.items()}


# ---------------------------------------------------------------------------------------------- QLoRA
def bench_qlora(name: str, args: argparse.Namespace) -> list[Row]:
    """QLoRA: the LoRA training step and its memory on the same NF4 (double-quantized) base, graftkit vs peft.

    The base is written once to a temporary folder and loaded twice through transformers'
    ``BitsAndBytesConfig``, so both libraries train on identical quantized weights."""
    import tempfile

    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    batch, seq = TRAIN_SHAPES[name] if args.batch is None else (args.batch, args.seq)
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
    return [(name, "QLoRA nf4 train step (ms)", step), (name, "QLoRA step memory (MiB)", mem)]


# ---------------------------------------------------------------------------------------------- report
def print_table(rows: list[Row], columns: list[str], ratios: list[tuple[str, str]]) -> None:
    """A markdown table: one column per variant present, then the ratios asked for (blank where undefined)."""
    columns = [c for c in columns if any(c in values for _, _, values in rows)]
    ratios = [(a, b) for a, b in ratios if a in columns and b in columns]
    heads = ["model", "metric"] + columns + [f"{a}/{b}" for a, b in ratios]
    widths = [14, 36] + [max(9, len(c)) for c in columns] + [max(7, len(f"{a}/{b}")) for a, b in ratios]
    print("| " + " | ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(heads, widths))) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for model, metric, values in rows:
        cells = [model.ljust(widths[0]), metric.ljust(widths[1])]
        cells += [(f"{values[c]:.1f}" if c in values else "").rjust(w) for c, w in zip(columns, widths[2:])]
        for (a, b), w in zip(ratios, widths[2 + len(columns):]):
            ok = a in values and b in values and values[b] > 0
            cells.append((f"{values[a] / values[b]:.3f}" if ok else "").rjust(w))
        print("| " + " | ".join(cells) + " |")


# The performance issue's targets, as (metric pattern, numerator, denominator, bound, device); a pattern ending
# in "*" matches every metric that starts with the rest, any other pattern only itself.
TARGETS = [
    ("train step (ms), dropout 0", "graftkit", "floor", 1.10, "cuda"),
    ("train step (ms), dropout 0.05", "graftkit", "floor", 1.15, "cuda"),
    ("unmerged prefill*", "graftkit", "base", 1.08, "cuda"),
    ("train step (ms)*", "graftkit", "peft", 0.85, "cpu"),
]


def _matches(pattern: str, metric: str) -> bool:
    return metric.startswith(pattern[:-1]) if pattern.endswith("*") else metric == pattern


def print_targets(rows: list[Row], device: str) -> None:
    for model, metric, values in rows:
        for pattern, a, b, bound, where in TARGETS:
            if where == device and _matches(pattern, metric) and a in values and b in values:
                ratio = values[a] / values[b]
                print(f"target {model}, {metric}: {a}/{b} = {ratio:.3f} (<= {bound}) "
                      f"{'met' if ratio <= bound else 'NOT met'}")
        if device == "cuda" and metric.startswith("step memory") and "graftkit" in values and "floor" in values:
            extra = (values["graftkit"] - values["floor"]) / 1024
            print(f"target {model}, {metric}: graftkit - floor = {extra:.2f} GiB (<= 2.5) "
                  f"{'met' if extra <= 2.5 else 'NOT met'}")
        if device == "cuda" and metric.startswith("merge_and_unload") and "graftkit" in values:
            print(f"target {model}, {metric}: {values['graftkit']:.1f} ms (< 10) "
                  f"{'met' if values['graftkit'] < 10 else 'NOT met'}")
    by_model: dict[str, dict[str, dict[str, float]]] = {}
    for model, metric, values in rows:
        by_model.setdefault(model, {})[metric] = values
    for model, metrics in by_model.items():
        single, mixed16 = metrics.get("unmerged prefill, 1 adapter (ms)"), metrics.get("mixed, 16 adapter(s) (ms)")
        if single and mixed16:
            parts = ", ".join(f"{k} {mixed16[k] / single[k]:.3f}" for k in single if k != "base" and k in mixed16)
            bound = " (target <= 1.3)" if device == "cuda" else ""
            print(f"{model}: mixed batch of 16 adapters / single-adapter prefill{bound}: {parts}")


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
    peft_cols = [c for c, _ in peft_variants(args)]
    suites = [
        ("train", bench_train, "Training (floor: frozen base, forward + backward to the activations)",
         ["graftkit", *peft_cols, "floor"],
         [("graftkit", c) for c in peft_cols] + [("graftkit", "floor")] + [(c, "floor") for c in peft_cols]),
        ("qlora", bench_qlora, "QLoRA on a 4-bit NF4 base", ["graftkit", "peft"], [("graftkit", "peft")]),
        ("inference", bench_inference, "Inference, 16 rows (base: the plain base model; merge times have none)",
         ["graftkit", *peft_cols, "base"],
         [("graftkit", c) for c in peft_cols] + [("graftkit", "base")] + [(c, "base") for c in peft_cols]),
    ]
    all_rows: list[Row] = []
    for key, bench, title, columns, ratios in suites:
        if args.suite in ("all", key):
            rows = [row for name in names for row in bench(name, args)]
            print("\n" + title)
            print_table(rows, columns, ratios)
            all_rows += rows
    print()
    print_targets(all_rows, args.device)


if __name__ == "__main__":
    main()
