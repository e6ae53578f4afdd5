"""LoRA initialisations that learn from data before the adapter exists: LoRA-GA (weight gradients), CorDA (input
covariances) and EVA (principal directions of each layer's inputs, with ranks redistributed by explained variance).

Each has the ecosystem's data-taking call: ``preprocess_loraga`` / ``preprocess_corda`` before ``get_peft_model``
(they leave their result on the target layers, which ``LoraLinear`` turns into A and B), and
``initialize_lora_eva_weights`` after it (it rewrites A, the ranks and the config of an ``init_lora_weights="eva"``
adapter). Caches use HF peft's file format, so they move between the two libraries.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ...errors import CheckpointError, ConfigError, TargetError, UnsupportedError, UsageError
from ...weights import get_weight, is_quantized
from .config import EvaConfig, LoraConfig
from .inits import INITS
from .linear import LoraLinear


def _prepared_targets(model: nn.Module, lora_config: LoraConfig, init: str) -> list[tuple[str, nn.Module]]:
    """The linear layers a preprocessing call prepares (``lora_config``'s targets), refusing quantized ones."""
    from ...inject import find_targets, is_linear

    if lora_config.init_lora_weights != init:
        raise ConfigError(f"preprocess_{init.replace('_', '')} is for init_lora_weights={init!r}, got "
                          f"{lora_config.init_lora_weights!r}; set it in the LoraConfig you pass to get_peft_model")
    targets = [(n, model.get_submodule(n)) for n in find_targets(model, lora_config)]
    targets = [(n, m) for n, m in targets if is_linear(m)]
    if not targets:
        raise TargetError(f"init_lora_weights={init!r}: the config targets no linear layer of the model (it "
                          "initialises nn.Linear and Conv1D layers)")
    quantized = [n for n, m in targets if is_quantized(m)]
    if quantized:
        raise UnsupportedError(f"init_lora_weights={init!r} needs full-precision weights; {quantized[:3]} are "
                               "quantized. Prepare and attach on the float model, quantize the residual afterwards")
    return targets


def _read_cache(path: str | os.PathLike[str] | None, keys: list[str]) -> dict[str, torch.Tensor] | None:
    """A tensor dict written by ``torch.save`` (read without unpickling code), if ``path`` holds one."""
    if path is None or not os.path.isfile(path) or os.path.getsize(path) == 0:
        return None
    try:
        cache = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which
        raise CheckpointError(f"{path}: not a readable tensor cache ({type(err).__name__}: {err}); delete it to "
                              "recompute") from err
    missing = [k for k in keys if not isinstance(cache, dict) or k not in cache]
    if missing:
        raise CheckpointError(f"{path}: no cached tensor {missing[:3]}; it was built for another model or config, "
                              "delete it to recompute")
    return cache


def _write_cache(path: str | os.PathLike[str] | None, tensors: dict[str, torch.Tensor]) -> None:
    """Write the cache whole or not at all (a temporary file renamed over the target)."""
    if path is None:
        return
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.partial"
    torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, partial)
    os.replace(partial, path)


def preprocess_loraga(model: nn.Module, lora_config: LoraConfig, train_step: Any,
                      cache_file: str | os.PathLike[str] | None = None) -> None:
    """Estimate the gradient of every weight ``lora_config`` targets, for ``init_lora_weights="lora_ga"``.

    ``train_step()`` runs forward and backward passes on a few batches (gradients are taken for the targeted weights
    only, averaged over the backward passes); the next ``get_peft_model(model, lora_config)`` turns them into A and B
    and drops them. With ``cache_file`` the gradients are read from that file when it exists, else computed and
    written there (HF peft's cache format: ``torch.save`` of ``{"<module>._peft_loraga_grad": tensor}``). The
    model's ``requires_grad`` flags and train/eval mode are restored, also when ``train_step`` raises.

    Raises:
        ConfigError: ``lora_config.init_lora_weights`` is not ``"lora_ga"``.
        TargetError: no linear layer is targeted.
        UnsupportedError: a target is quantized (LoRA-GA needs full-precision gradients).
        CheckpointError: the cache file lacks a target's gradient.
        UsageError: ``train_step`` ran no backward pass through a target.
    """
    attr = INITS["lora_ga"].prepared
    targets = _prepared_targets(model, lora_config, "lora_ga")
    cache = _read_cache(cache_file, [f"{n}._peft_loraga_grad" for n, _ in targets])
    if cache is not None:
        for name, module in targets:
            setattr(module, attr, cache[f"{name}._peft_loraga_grad"].to(module.weight.device))
        return
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    counts = {name: 0 for name, _ in targets}
    hooks = []
    try:
        for param in flags:
            param.requires_grad_(False)
        for name, module in targets:
            module.weight.grad = None
            module.weight.requires_grad_(True)
            hooks.append(module.weight.register_hook(  # once per backward pass through the layer
                lambda _grad, name=name: counts.__setitem__(name, counts[name] + 1)))
        model.train()
        with torch.enable_grad():
            train_step()
        silent = [n for n, m in targets if not counts[n] or m.weight.grad is None]
        if silent:
            raise UsageError(f"preprocess_loraga: train_step ran no backward pass through {silent[:3]}; it should "
                             "call loss.backward() on a few batches")
        for name, module in targets:
            setattr(module, attr, module.weight.grad.detach() / counts[name])
    finally:
        for hook in hooks:
            hook.remove()
        for _, module in targets:
            module.weight.grad = None
        for param, flag in flags.items():
            param.requires_grad_(flag)
        model.train(was_training)
    _write_cache(cache_file, {f"{n}._peft_loraga_grad": getattr(m, attr) for n, m in targets})


@torch.no_grad()
def preprocess_corda(model: nn.Module, lora_config: LoraConfig, run_model: Any = None,
                     hooked_model: nn.Module | None = None) -> None:
    """Collect each targeted layer's input covariance while ``run_model()`` runs the model on sample data, and
    decompose the layer for ``init_lora_weights="corda"`` (context-oriented: the SVD of W·C, mapped back through C⁻¹).
    The next ``get_peft_model(model, lora_config)`` takes the r directions ``corda_config["corda_method"]`` asks
    for ("ipm": the top r, "kpm": the bottom r) into the adapter and drops the rest.

    ``corda_config["covariance_file"]`` / ``["cache_file"]`` reuse the covariances / the decomposition when those files
    exist (then ``run_model`` may be ``None``) and are written otherwise, in HF peft's format. ``hooked_model``: run
    the statistics on another model with the same module names (rarely needed). Inputs are taken as rows of the
    layer's last dimension, each forward call scaled by its largest value, as the ecosystem does.

    Raises:
        ConfigError: ``lora_config.init_lora_weights`` is not ``"corda"``.
        TargetError: no linear layer is targeted.
        UnsupportedError: a target is quantized.
        UsageError: no cache and no ``run_model``, a layer saw no input, or an input held NaN/Inf.
        CheckpointError: a cache file lacks a layer.
    """
    targets = _prepared_targets(model, lora_config, "corda")
    settings = lora_config.corda_config or {}
    ranks = {n: lora_config.rank_and_alpha(n)[0] for n, _ in targets}
    keys = [f"{n}.eigens.{part}" for n, _ in targets for part in ("S_WC", "U_WC", "V_WC")]
    cache = _read_cache(settings.get("cache_file"), keys)
    if cache is None:
        covariances = _read_cache(settings.get("covariance_file"), [n for n, _ in targets])
        if covariances is None:
            covariances = _input_covariances(targets, hooked_model or model, run_model,
                                             settings.get("use_float16_for_covariance", False))
            _write_cache(settings.get("covariance_file"), covariances)
        cache = {}
        for name, module in targets:
            if settings.get("verbose"):
                print(f"CorDA: decomposing {name}")
            w = get_weight(module).to(torch.float32)
            w = w.T if type(module).__name__ == "Conv1D" else w
            sv, u, v = _context_svd(w, covariances[name].to(w.device, torch.float32))
            keep = slice(0, ranks[name]) if settings.get("corda_method", "ipm") == "ipm" else slice(-ranks[name], None)
            cache.update({f"{name}.eigens.S_WC": sv[keep].clone(), f"{name}.eigens.U_WC": u[:, keep].clone(),
                          f"{name}.eigens.V_WC": v[:, keep].clone()})
        _write_cache(settings.get("cache_file"), cache)
    for name, module in targets:
        parts = (cache[f"{name}.eigens.{p}"].to(module.weight.device) for p in ("S_WC", "U_WC", "V_WC"))
        setattr(module, INITS["corda"].prepared, tuple(parts))


def _input_covariances(targets: list[tuple[str, nn.Module]], hooked: nn.Module, run_model: Any,
                       half: bool) -> dict[str, torch.Tensor]:
    """Σ XᵀX / calls over ``run_model()``'s forward calls through each target (X: the call's input rows, scaled by
    the largest value)."""
    if run_model is None:
        raise UsageError("preprocess_corda needs run_model (a callable that runs the model on sample data) when "
                         "corda_config has no existing covariance_file or cache_file")
    sums: dict[str, Any] = {n: 0 for n, _ in targets}
    calls = {n: 0 for n, _ in targets}

    def hook(name: str):
        def collect(_module: nn.Module, args: tuple, _output: Any) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]) if half else x.reshape(-1, x.shape[-1]).float()
            x = x / x.max().abs()
            if not bool(torch.isfinite(x).all()):
                raise UsageError(f"preprocess_corda: the input of '{name}' holds NaN/Inf (or is all zero); check the "
                                 "sample data")
            sums[name] = sums[name] + x.T @ x
            calls[name] += 1
        return collect

    by_name = dict(hooked.named_modules())
    handles = [by_name[n].register_forward_hook(hook(n)) for n, _ in targets if n in by_name]
    was_training = hooked.training
    hooked.eval()
    try:
        run_model()
    finally:
        for handle in handles:
            handle.remove()
        hooked.train(was_training)
    silent = [n for n, _ in targets if not calls[n]]
    if silent:
        raise UsageError(f"preprocess_corda: run_model sent no input through {silent[:3]}; run the model on sample "
                         "data inside it")
    return {n: sums[n] / calls[n] for n, _ in targets}


def _context_svd(w: torch.Tensor, covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(S, U, V) with W = U diag(S) Vᵀ and W·C̃ = U diag(S) (C̃ V)ᵀ an SVD, C̃ the covariance damped until it
    inverts well (a multiple of its mean diagonal added, doubled from 1% while ‖C̃ C̃⁻¹ − I‖ ≥ 0.05)."""
    eye = torch.eye(covariance.shape[0], device=covariance.device)
    damp = 0.01
    while True:
        fixed = covariance + eye * (torch.diag(covariance).mean() * damp)
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < 0.05:
            break
        damp *= 2
    u, sv, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    return sv, u, (vh @ inverse).T


# ---------------------------------------------------------------------------------------------------------------- EVA
class _IncrementalPCA:
    """Principal components of rows that arrive in batches (Ross et al. 2008, the form scikit-learn uses): the mean
    and variance are updated in float64 (Chan et al.), and each batch's SVD runs on [S·Vᵀ of the last fit; the
    centred batch; a mean-correction row], so no earlier row is kept. The SVD is randomized (q = 2k, 4 power
    iterations) from a fixed seed, signs chosen so the largest entry of each component is positive: the same inputs
    give the same components as the ecosystem's EVA."""

    def __init__(self, n_components: int, seed: int = 42) -> None:
        self.k = n_components
        self.seed = seed
        self.seen = torch.tensor([0])
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None
        self.components: torch.Tensor | None = None  # (k, d)
        self.singular_values: torch.Tensor | None = None  # (k,)
        self.explained_variance_ratio: torch.Tensor | None = None  # (k,)

    def _moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = torch.tensor([x.shape[0]], device=x.device)
        total = self.seen.to(x.device) + n
        batch_sum = x.sum(dim=0, dtype=torch.float64)
        old_sum = torch.zeros_like(batch_sum) if self.mean is None else self.mean * self.seen.to(x.device)
        mean = (old_sum + batch_sum) / total
        centred = x - batch_sum / n
        correction = centred.sum(dim=0, dtype=torch.float64).square()
        spread = centred.square().sum(dim=0, dtype=torch.float64) - correction / n
        if self.var is None:
            return mean, spread / total, total
        ratio = self.seen.to(x.device).double() / n
        spread = self.var * self.seen.to(x.device) + spread + ratio / total * (old_sum / ratio - batch_sum).square()
        return mean, spread / total, total

    def partial_fit(self, x: torch.Tensor) -> None:
        x = x.to(torch.float32).clone()
        mean, var, total = self._moments(x)
        if self.components is None:
            x -= mean
        else:
            batch_mean = x.mean(dim=0)
            x -= batch_mean
            shift = torch.sqrt(self.seen.to(x.device).double() / total * x.shape[0]) * (self.mean - batch_mean)
            x = torch.vstack((self.singular_values.view(-1, 1) * self.components, x, shift))
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            _, sv, v = torch.svd_lowrank(x, q=2 * self.k, niter=4)
        vt = v.mH
        signs = torch.sign(vt[torch.arange(vt.shape[0]), torch.argmax(vt.abs(), dim=1)])
        vt = vt * signs.view(-1, 1)
        self.seen, self.mean, self.var = total, mean, var
        self.components = vt[: self.k]
        self.singular_values = sv[: self.k]
        self.explained_variance_ratio = (sv.square() / torch.sum(var * total))[: self.k]


def _language_model_rows(model_input: Any, config: LoraConfig) -> torch.Tensor:
    """Positions (batch, token) that count: attended and, with ``use_label_mask``, not a masked label."""
    if not isinstance(model_input, dict) or "input_ids" not in model_input:
        raise UsageError("EVA's default input handling expects batches as dicts with 'input_ids' (and optionally "
                         "'attention_mask', 'labels'); pass prepare_model_inputs_fn / prepare_layer_inputs_fn for "
                         "other inputs")
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    eva = config.eva_config or {}
    if eva.get("use_label_mask", True) and "labels" in model_input:
        mask = mask & (model_input["labels"] != eva.get("label_mask_value", -100))
    return mask.nonzero()


def _language_model_layer_rows(layer_input: Any, rows: torch.Tensor, layer_name: str) -> torch.Tensor:
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    if not isinstance(x, torch.Tensor):
        raise UsageError(f"EVA: the input of '{layer_name}' is a {type(x).__name__}; pass prepare_layer_inputs_fn")
    return x[rows.T.unbind()]


def _to_device(inputs: Any, device: torch.device | None) -> Any:
    if device is None:
        return inputs
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, dict):
        return type(inputs)({k: _to_device(v, device) for k, v in inputs.items()})
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_to_device(v, device) for v in inputs)
    return inputs


def _eva_targets(model: nn.Module, config: LoraConfig | None, adapter_name: str) -> tuple[nn.Module, LoraConfig,
                                                                                          list[tuple[str, nn.Module]]]:
    """(model to run, config, [(path, module to hook)]): a graftkit model's LoRA linear layers of the adapter, or the
    linear layers ``config`` targets in a plain model."""
    from ...inject import find_targets, is_linear
    from ...layer import AdaptedLayer
    from ...model import wrappers

    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict):
        if adapter_name not in configs or not isinstance(configs[adapter_name], LoraConfig):
            raise UsageError(f"EVA: no LoRA adapter named '{adapter_name}'; adapters: {sorted(configs)}")
        config = config or configs[adapter_name]
        inner = model.get_base_model()
        return inner, config, [(p, m) for p, m in wrappers(inner) if isinstance(m, AdaptedLayer)
                               and isinstance(m.adapters[adapter_name] if adapter_name in m.adapters else None,
                                              LoraLinear)]
    if config is None:
        raise UsageError("get_eva_state_dict needs peft_config= when the model is not a graftkit PeftModel")
    return model, config, [(n, model.get_submodule(n)) for n in find_targets(model, config)
                           if is_linear(model.get_submodule(n))]


@torch.no_grad()
def get_eva_state_dict(model: nn.Module, dataloader: Iterable, peft_config: LoraConfig | None = None,
                       forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                       prepare_model_inputs_fn: Callable[[Any, LoraConfig], Any] | None = _language_model_rows,
                       prepare_layer_inputs_fn: Callable[[Any, Any, str], torch.Tensor] | dict[str, Callable]
                       | None = _language_model_layer_rows,
                       adapter_name: str = "default", gather_distributed_inputs: bool = True,
                       show_progress_bar: bool = True) -> dict[str, torch.Tensor]:
    """EVA's data pass: for each targeted linear layer, the principal directions of its inputs over batches of
    ``dataloader`` (cycled until the directions it needs have converged), and how many each layer gets: the total
    rank budget (the sum of the configured ranks) goes to the directions with the largest explained variance, each
    layer taking at most round(rho·r). Layers that see the same input (q, k, v) share one decomposition.

    Returns ``{module path: (rank, in_features) tensor}`` (rank may be 0), for :func:`initialize_lora_eva_weights`.
    ``forward_fn(model, batch)`` defaults to ``model(**batch)``; the default input handling takes the attended, not
    label-masked positions of language-model batches. With ``torch.distributed`` initialised and
    ``gather_distributed_inputs`` (the default), every process fits each layer on all processes' rows of the step, in
    rank order, so all of them arrive at the same directions and ranks (their dataloaders must have the same length, as
    a ``DistributedSampler`` gives); ``False`` fits each process on its own rows. ``show_progress_bar`` is accepted for
    the ecosystem's signature (graftkit prints nothing).

    Raises:
        UsageError: the dataloader is empty, the model is not a PeftModel and no config is given, or a layer's
            directions never converge within 1,000 passes over the data.
    """
    del show_progress_bar
    gather = gather_distributed_inputs and _world_size() > 1
    forward_fn = forward_fn or (lambda m, batch: m(**batch))
    run_model, config, targets = _eva_targets(model, peft_config, adapter_name)
    if not targets:
        raise TargetError(f"EVA: no linear layer carries LoRA adapter '{adapter_name}'")
    if len(dataloader) == 0:  # type: ignore[arg-type]
        raise UsageError("EVA: the dataloader is empty")
    eva = {**dataclasses.asdict(EvaConfig()), **(config.eva_config or {})}
    rho = eva["rho"]
    if rho > 1000:
        rho = min(rho, max(max(p.shape) for p in run_model.parameters()) // config.r)
    layer_fns = dict(prepare_layer_inputs_fn) if isinstance(prepare_layer_inputs_fn, dict) else {}
    unknown = set(layer_fns) - {n for n, _ in targets}
    if unknown:
        raise UsageError(f"EVA: prepare_layer_inputs_fn names modules the adapter does not target: {sorted(unknown)}")

    def layer_fn(name: str) -> Callable:
        fn = layer_fns.get(name) if layer_fns else prepare_layer_inputs_fn
        if fn is None:
            def fn(layer_input: Any, _rows: Any, _name: str) -> torch.Tensor:
                x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
                return x.reshape(-1, x.shape[-1])
        return fn

    def prepared(batch: Any) -> Any:
        return prepare_model_inputs_fn(batch, config) if prepare_model_inputs_fn is not None else batch

    device = next((p.device for p in run_model.parameters() if p.device.type != "meta"), None)
    budget, limit = 0, {}
    for name, _ in targets:
        r = config.rank_and_alpha(name)[0]
        limit[name] = round(r * rho)
        budget += r
    was_training = model.training
    model.eval()
    disabled = model.disable_adapter() if isinstance(getattr(model, "peft_config", None), dict) else None
    handles: dict[str, Any] = {}
    try:
        if disabled is not None:
            disabled.__enter__()
        # 1. one batch to find layers that see the same input (they share a decomposition)
        first_batch = _to_device(next(iter(dataloader)), device)
        first_rows = prepared(first_batch)
        seen: dict[str, torch.Tensor] = {}

        def keep(name: str):
            def hook(_m: nn.Module, args: tuple, _out: Any) -> None:
                seen[name] = layer_fn(name)(args, first_rows, name).detach().clone()
            return hook
        hooks = [module.register_forward_hook(keep(name)) for name, module in targets]
        try:
            forward_fn(run_model if disabled is None else model, first_batch)
        finally:
            for hook in hooks:
                hook.remove()
        groups: dict[str, list[str]] = {}  # the layer that owns a decomposition -> the layers sharing its input
        for name, _ in targets:
            root = next((r for r in groups if seen[r].shape == seen[name].shape and torch.equal(seen[r], seen[name])),
                        name)
            groups.setdefault(root, []).append(name)
        seen.clear()
        owner = {m: root for root, members in groups.items() for m in members}
        for members in groups.values():
            widest = max(limit[m] for m in members)
            for m in members:
                limit[m] = widest
        # 2. incremental decompositions until every direction a layer is counted on has converged
        pcas = {root: _IncrementalPCA(limit[root]) for root in groups}
        converged = {root: torch.zeros(limit[root], dtype=torch.bool) for root in groups}
        state = {"rows": None}

        def fit(root: str):
            def hook(_m: nn.Module, args: tuple, _out: Any) -> None:
                x = layer_fn(root)(args, state["rows"], root)
                if gather:
                    x = _gather_rows(x.detach())
                if x.shape[0] < pcas[root].k:
                    return  # fewer positions than components: this batch cannot be used for this layer
                before = pcas[root].components
                before = None if before is None else before.clone()
                pcas[root].partial_fit(x.to(torch.float32))
                if before is not None:
                    similarity = torch.nn.functional.cosine_similarity(pcas[root].components, before)
                    converged[root] = (similarity >= eva["tau"]).cpu()
            return hook

        modules = dict(targets)
        for root in groups:
            handles[root] = modules[root].register_forward_hook(fit(root))
        done = {root: False for root in groups}
        ranks = dict(limit)
        for step, batch in enumerate(itertools.cycle(dataloader)):
            if step > 1000 * max(1, len(dataloader)):  # type: ignore[arg-type]
                raise UsageError(f"EVA: the input directions of {[r for r in groups if not done[r]][:3]} did not "
                                 f"converge (tau={eva['tau']}); lower tau or give more varied data")
            batch = _to_device(batch, device)
            for root in groups:
                now = bool(torch.all(converged[root][: ranks[root]]))
                if not done[root] and now and handles.get(root) is not None:
                    handles.pop(root).remove()
                    done[root] = True
                    continue
                if done[root] and not now:
                    handles[root] = modules[root].register_forward_hook(fit(root))
                    done[root] = False
            if all(done.values()):
                break
            state["rows"] = prepared(batch)
            forward_fn(run_model if disabled is None else model, batch)
            if any(p.components is None for p in pcas.values()):
                continue
            ranks = _distribute(pcas, owner, groups, limit, budget)
    finally:
        for handle in handles.values():
            handle.remove()
        if disabled is not None:
            disabled.__exit__(None, None, None)
        model.train(was_training)
    out = {}
    for name, rank in ranks.items():
        pca = pcas[owner[name]]
        u = pca.components[:rank].clone()
        if eva["whiten"]:
            u /= pca.singular_values[:rank].sqrt().reshape(-1, 1)
        out[name] = u if device is None else u.to(device)
    return out


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every process's rows of ``x`` (n_i, d), in rank order (the row counts may differ)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    width = int(max(c.item() for c in counts))
    padded = x.new_zeros((width, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(c.item())] for part, c in zip(parts, counts, strict=True)])


def _distribute(pcas: dict[str, _IncrementalPCA], owner: dict[str, str], groups: dict[str, list[str]],
                limit: dict[str, int], budget: int) -> dict[str, int]:
    """Ranks per layer: the ``budget`` largest explained-variance ratios over all layers' candidate directions
    (a layer's first ``limit`` ones; layers sharing an input each list the shared ones); a layer sharing an input
    keeps at most the rank of the layer that owns the decomposition."""
    sharing = [(m, root) for root, members in groups.items() for m in members[1:]]
    layers = list(groups) + [m for m, _ in sharing]
    keys, values = [], []
    for name in layers:
        for value in pcas[owner[name]].explained_variance_ratio[: limit[name]]:
            keys.append(name)
            values.append(value)
    order = torch.stack(values).argsort(descending=True)
    counts = Counter(keys[i] for i in order[:budget].tolist())
    ranks = {name: counts.get(name, 0) for name in layers}
    for name, root in sharing:
        if ranks[root] < ranks[name]:
            ranks[root], ranks[name] = ranks[name], ranks[root]
    return ranks


@torch.no_grad()
def initialize_lora_eva_weights(model: nn.Module, dataloader: Iterable | None = None,
                                eva_state_dict: dict[str, torch.Tensor] | None = None,
                                forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                                prepare_model_inputs_fn: Callable[[Any, LoraConfig], Any] | None = _language_model_rows,
                                prepare_layer_inputs_fn: Callable | dict[str, Callable] | None =
                                _language_model_layer_rows,
                                adapter_name: str = "default", gather_distributed_inputs: bool = True,
                                show_progress_bar: bool = True) -> nn.Module:
    """Give an ``init_lora_weights="eva"`` adapter its data-driven start: each layer's A becomes the top principal
    directions of its inputs (:func:`get_eva_state_dict`, or ``eva_state_dict`` computed before), at the rank EVA gave
    it; B stays zero, so the model still computes the base function. A layer given rank 0 loses its adapter; with
    ``adjust_scaling_factors`` a layer's lora_alpha follows its rank. The config records what was built
    (target_modules, rank_pattern, alpha_pattern), so the saved adapter loads in graftkit and HF peft.

    Raises:
        UsageError: the model has no such LoRA adapter, its init is not "eva", several adapters are active, or
            neither a dataloader nor a state dict is given.
    """
    from ...inject import set_submodule
    from ...layer import AdaptedLayer
    from ...model import wrappers

    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or adapter_name not in configs:
        raise UsageError(f"initialize_lora_eva_weights needs a graftkit PeftModel with adapter '{adapter_name}'")
    config = configs[adapter_name]
    if not isinstance(config, LoraConfig) or config.init_lora_weights != "eva":
        raise UsageError(f"initialize_lora_eva_weights works on an adapter made with init_lora_weights='eva'; "
                         f"'{adapter_name}' has {getattr(config, 'init_lora_weights', None)!r}")
    if len(getattr(model, "active_adapters", [adapter_name])) > 1:
        raise UsageError("initialize_lora_eva_weights works with one active adapter; set_adapter() one first")
    if eva_state_dict is None:
        if dataloader is None:
            raise UsageError("initialize_lora_eva_weights needs a dataloader (or an eva_state_dict)")
        eva_state_dict = get_eva_state_dict(model, dataloader, None, forward_fn, prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn, adapter_name, gather_distributed_inputs,
                                            show_progress_bar)
    from .method import Lora

    eva = config.eva_config or {}
    inner = model.get_base_model()
    kept, missing, rank_pattern, alpha_pattern = [], [], {}, {}
    for path, layer in list(wrappers(inner)):
        if not isinstance(layer, AdaptedLayer) or adapter_name not in layer.adapters:
            continue
        r, alpha = config.rank_and_alpha(path)
        old = layer.adapters[adapter_name]
        if path in eva_state_dict and isinstance(old, LoraLinear):
            w = eva_state_dict[path]
            rank = w.shape[0]
            if rank == 0:
                layer.remove(adapter_name)
                if not layer.adapters:
                    set_submodule(inner, path, layer.base_layer)
                continue
            if rank != r and eva.get("adjust_scaling_factors", True):
                alpha *= rank / r
            if rank != r:
                fresh = Lora.create_adapter(layer.base_layer, dataclasses.replace(
                    config, r=rank, lora_alpha=alpha, rank_pattern={}, alpha_pattern={}), path)
                fresh.requires_grad_(old.lora_A.weight.requires_grad)
                layer.replace(adapter_name, fresh)
            layer.adapters[adapter_name].lora_A.weight.copy_(w)
            kept.append(path)
        else:
            missing.append(path)
            rank = r
        if rank != config.r:
            rank_pattern[path] = rank
        if alpha != config.lora_alpha:
            alpha_pattern[path] = alpha
    config.target_modules = kept + missing
    config.rank_pattern = rank_pattern
    config.alpha_pattern = alpha_pattern
    if missing:
        warnings.warn(f"EVA initialised linear layers only; {missing[:5]} keep the default start (A random, B zero)",
                      stacklevel=2)
    return model
