"""Optimizers made for LoRA: LoRA+ (B learns faster than A) and LoRA-FA (A frozen, B's gradient projected).

LoRA+ (Hayou et al., 2024) gives B a learning rate ``loraplus_lr_ratio`` times A's::

    group        parameters                                            lr                   weight decay
    A            lora_A and every other trained matrix                 lr                   loraplus_weight_decay
    embedding    LoRA factors of an adapted nn.Embedding               loraplus_lr_embedding loraplus_weight_decay
    B            lora_B, and trained 1-D tensors (DoRA magnitudes ...)  lr · ratio           loraplus_weight_decay
    B, no decay  those of B that are biases or live in a LayerNorm      lr · ratio           0

LoRA-FA (Zhang et al., 2023) freezes A and trains B with AdamW on a projected gradient: with the update s·B A,
the gradient B would need for the full-rank update to follow the full-rank gradient is

    g̃_B = (1 / s²) · g_B · (A Aᵀ + δ I)⁻¹          δ = 1e-8, s the adapter's scaling

The AdamW step is the decoupled one (bias-corrected step size, then ``p ← p − lr · wd · p``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, UsageError
from .layer import AdaptedLayer

_NORMS = (nn.LayerNorm,)  # the norm layers whose weights are not decayed


def _decayed(model: nn.Module) -> set[str]:
    """Names of the parameters that take weight decay: not a bias, not inside a LayerNorm."""
    skip = {f"{path}.{n}" if path else n for path, module in model.named_modules() if isinstance(module, _NORMS)
            for n, _ in module.named_parameters()}
    return {n for n, _ in model.named_parameters() if n not in skip and "bias" not in n}


def _owner(model: nn.Module, name: str) -> nn.Module | None:
    path = ".".join(name.split(".")[:-2])
    try:
        return model.get_submodule(path) if path else None
    except AttributeError:
        return None


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], *, lr: float,
                              loraplus_lr_ratio: float, **kwargs: Any) -> torch.optim.Optimizer:
    """An optimizer whose LoRA B factors learn ``loraplus_lr_ratio`` times faster than A (see the module docstring).

    Args:
        model: the model (its parameters that require grad are optimized).
        optimizer_cls: e.g. ``torch.optim.AdamW`` or a bitsandbytes 8-bit optimizer (embeddings then keep 32-bit
            state, as bitsandbytes advises).
        lr: A's learning rate. loraplus_lr_ratio: B's learning rate over A's (the paper: 2 to 16).
        kwargs: ``loraplus_lr_embedding`` (default 1e-6), ``loraplus_weight_decay`` (default 0.0), and anything
            else for ``optimizer_cls``.

    Raises:
        ConfigError: a learning rate or ratio that is not a positive finite number.
    """
    for what, value in (("lr", lr), ("loraplus_lr_ratio", loraplus_lr_ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"create_loraplus_optimizer: {what} must be a positive number, got {value!r}")
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    lr_embedding = kwargs.pop("loraplus_lr_embedding", 1e-6)
    decayed = _decayed(model)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        owner = _owner(model, name)
        if isinstance(owner, AdaptedLayer) and isinstance(owner.get_base_layer(), nn.Embedding):
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            groups["B" if name in decayed else "B_no_decay"].append(param)
        else:
            groups["A"].append(param)
    optimizer = optimizer_cls([
        {"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": weight_decay, "lr": lr_embedding},
        {"params": groups["B"], "weight_decay": weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ], lr=lr, **kwargs)
    if type(optimizer).__name__ in ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit"):
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer


class LoraFAOptimizer(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) where each LoRA B gets the LoRA-FA projected gradient (see the module
    docstring). Each parameter group holds ``names`` (one per parameter) and ``scaling_factors`` (the adapter's
    scaling for LoRA factors, ``None`` elsewhere); a B is paired with the A of the same layer and adapter.

    Its state is keyed by parameter, as torch's optimizers', so ``state_dict()`` / ``load_state_dict()`` work.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True) -> None:
        checks = {"lr": lr >= 0.0, "betas[0]": 0.0 <= betas[0] < 1.0, "betas[1]": 0.0 <= betas[1] < 1.0,
                  "eps": eps >= 0.0}
        for what, ok in checks.items():
            if not ok:
                raise ConfigError(f"LoraFAOptimizer: invalid {what} (lr, eps >= 0; betas in [0, 1)); got lr={lr}, "
                                  f"betas={betas}, eps={eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "correct_bias": correct_bias})

    @staticmethod
    def _pairs(group: dict[str, Any]) -> dict[int, tuple[torch.Tensor, float]]:
        """id(B) -> (its A, the adapter's scaling), from the group's parameter names."""
        by_name = dict(zip(group["names"], group["params"], strict=True))
        scales = dict(zip(group["names"], group["scaling_factors"], strict=True))
        pairs = {}
        for name, param in by_name.items():
            if ".lora_B." in name:
                a = by_name.get(name.replace(".lora_B.", ".lora_A.", 1))
                if a is not None and scales.get(name) is not None:
                    pairs[id(param)] = (a, float(scales[name]))
        return pairs

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if "names" not in group or "scaling_factors" not in group:
                raise UsageError("LoraFAOptimizer needs 'names' and 'scaling_factors' in each parameter group; "
                                 "build it with graftkit.optimizers.create_lorafa_optimizer(model, ...)")
            pairs = self._pairs(group)
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if id(param) in pairs:
                    a, scale = pairs[id(param)]
                    a32 = a.detach().float()  # (r, in)
                    eye = torch.eye(a32.shape[0], device=a32.device)
                    inverse = torch.linalg.pinv(a32 @ a32.T + 1e-8 * eye)  # (r, r)
                    grad = ((grad.float() @ inverse) / scale**2).to(grad.dtype)  # (out, r)
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size *= math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                param.addcdiv_(exp_avg, denom, value=-step_size)
                if group["weight_decay"] > 0.0:
                    param.add_(param, alpha=-group["lr"] * group["weight_decay"])
        return loss


def create_lorafa_optimizer(model: nn.Module, r: int, lora_alpha: float, lr: float, weight_decay: float = 0.0,
                            use_rslora: bool | None = None) -> LoraFAOptimizer:
    """Freeze every LoRA A of ``model`` and return a :class:`LoraFAOptimizer` over its parameters.

    Each B's projection uses its own adapter's scaling (rank and alpha patterns, rsLoRA included); ``r``,
    ``lora_alpha`` and ``use_rslora`` are accepted for the ecosystem's signature and checked against the model.

    Raises:
        ConfigError: ``use_rslora`` given and differing from an active adapter's config.
    """
    configs = getattr(model, "peft_config", {})
    active = [a for a in getattr(model, "active_adapters", []) if a in configs]
    if use_rslora is not None:
        differ = [a for a in active if bool(getattr(configs[a], "use_rslora", False)) != use_rslora]
        if differ:
            raise ConfigError(f"create_lorafa_optimizer(use_rslora={use_rslora}) but adapters {differ} are configured "
                              "otherwise; set use_rslora in LoraConfig and leave it out here")
    for name, param in model.named_parameters():
        if "lora_A" in name:
            param.requires_grad_(False)

    def scaling(name: str) -> float | None:
        if ".lora_" not in name:
            return None
        path, _, rest = name.rpartition(".lora_")  # <layer>.lora_B.<adapter>.weight
        parts = rest.split(".")
        try:
            layer = model.get_submodule(path) if len(parts) >= 2 else None
        except AttributeError:
            layer = None
        adapter = layer.adapters.get(parts[1]) if isinstance(layer, AdaptedLayer) else None
        value = getattr(adapter, "scaling", None)
        return float(value) if isinstance(value, (int, float)) else None

    named = list(model.named_parameters())
    return LoraFAOptimizer([{"params": [p for _, p in named], "names": [n for n, _ in named],
                             "scaling_factors": [scaling(n) for n, _ in named], "lr": lr,
                             "betas": (0.9, 0.999), "weight_decay": weight_decay}])


__all__ = ["LoraFAOptimizer", "create_lorafa_optimizer", "create_loraplus_optimizer"]
