"""AdaLoRA: adaptive budget allocation for parameter-efficient fine-tuning (Zhang et al. 2023).

::

            ┌──────────── W (frozen) ─────────────┐
    x ──────┤                                     ├──(+)──► y = W x + s/(r₀+ε) · P (Λ ⊙ Q) x
            └─ dropout ─► Q (r×in) ─► Λ ─► P (out×r)
                                   (singular values, one per rank)

The update is kept in SVD form: ``lora_A`` = Q (right singular vectors), ``lora_E`` = Λ (singular values,
zero at the start), ``lora_B`` = P (left singular vectors); s is ``lora_alpha`` and r₀ the initial rank
``init_r`` (the scale does not change when ranks are pruned). Training adds an orthogonality penalty

    R = mean over every P and Q of ‖PᵀP − I‖_F and ‖Q Qᵀ − I‖_F,  weighted by ``orth_reg_weight``

to the loss, and :meth:`AdaLora.update_and_allocate`, called once per optimizer step while the gradients
are still there, prunes ranks to a budget that falls cubically from Σ r₀ to ``target_r`` per layer
between steps ``tinit`` and ``total_step - tfinal``. A rank's importance is

    score(i) = S(Λᵢ) + mean_j S(Qᵢⱼ) + mean_j S(Pⱼᵢ),   S(w) = Ī(w) · Ū(w),
    I(w) = |w · ∂L/∂w|,  Ī ← β₁ Ī + (1−β₁) I,  Ū ← β₂ Ū + (1−β₂) |I − Ī|

and the ranks with the lowest scores get Λᵢ = 0. The kept ranks are recorded in the config's ``rank_pattern``
(``"<module path>.lora_E": [kept per rank]``); a save writes only the kept ranks, and a load builds each
layer with its kept ranks, as the ecosystem's format has it.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PeftType
from ..errors import CheckpointError, ConfigError, UnsupportedError, UsageError
from ..kernels.lora import FusedLoraLinear, LoraUpdate, can_fuse, can_seed_dropout, draw_seed
from ..layer import AdaptedLayer, LayerAdapter
from ..registry import Method, register
from ..weights import get_weight, linear_features
from .lora.config import LoraConfig
from .lora.linear import _adapter_dtype
from .lora.method import Lora, check_one_bias

_EPS = 1e-5  # keeps s / (r₀ + ε) finite for an adapter built with no ranks


@dataclasses.dataclass
class AdaLoraConfig(LoraConfig):
    """Config of an AdaLoRA adapter (field names and meanings as in the HF ecosystem; ``r`` is not used).

    Args:
        init_r: the rank every adapted layer starts with.
        target_r: the average rank per layer after pruning (the final budget is ``target_r`` × layers).
        tinit: steps of warm-up before any pruning.
        tfinal: steps at the end that train the final ranks without pruning.
        deltaT: prune every ``deltaT`` steps during the budget phase.
        beta1 / beta2: smoothing of the importance (sensitivity) and of its uncertainty, in (0, 1).
        orth_reg_weight: weight of the orthogonality penalty added to the training loss (>= 0).
        total_step: the number of optimizer steps of the run (required: the budget schedule depends on it).
        rank_pattern: the kept ranks per layer, written by pruning (``None`` before the first pruning).
    """

    peft_type: str | PeftType | None = PeftType.ADALORA
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None  # type: ignore[assignment]

    training_state_fields: ClassVar[frozenset[str]] = frozenset({"rank_pattern"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.ADALORA
        if self.use_dora:
            raise UnsupportedError("AdaLoraConfig: DoRA is not defined for AdaLoRA; set use_dora=False")
        if self.init_lora_weights == "gaussian":
            raise UnsupportedError("AdaLoraConfig.init_lora_weights must be True or False ('gaussian' is a LoRA init)")
        if self.r != 8:
            warnings.warn(f"AdaLoraConfig.r={self.r} is not used: AdaLoRA starts every layer at init_r="
                          f"{self.init_r}; set init_r instead", stacklevel=3)
        for field in ("init_r", "target_r", "deltaT"):
            if getattr(self, field) <= 0:
                raise ConfigError(f"AdaLoraConfig.{field} must be a positive integer, got {getattr(self, field)!r}")
        if self.target_r > self.init_r:
            raise ConfigError(f"AdaLoraConfig.target_r={self.target_r} is above init_r={self.init_r}: pruning only "
                              "lowers ranks; raise init_r or lower target_r")
        for field in ("tinit", "tfinal"):
            if getattr(self, field) < 0:
                raise ConfigError(f"AdaLoraConfig.{field} must be >= 0, got {getattr(self, field)!r}")
        for field in ("beta1", "beta2"):
            if not 0.0 < getattr(self, field) < 1.0:
                raise ConfigError(f"AdaLoraConfig.{field} must be in (0, 1), got {getattr(self, field)!r}")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"AdaLoraConfig.orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if self.total_step is None or self.total_step <= 0:
            raise ConfigError("AdaLoraConfig.total_step is required: the number of optimizer steps of the training "
                              f"run (the rank budget schedule depends on it), got {self.total_step!r}")
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(
                f"AdaLoraConfig: tinit={self.tinit} leaves no pruning phase before total_step - tfinal = "
                f"{self.total_step - self.tfinal}; lower tinit or tfinal, or raise total_step"
            )

    def _check_patterns(self) -> None:
        if self.alpha_pattern:  # AdaLoRA scales every layer by lora_alpha / init_r (as in HF peft): no silent ignore
            raise UnsupportedError(f"AdaLoraConfig.alpha_pattern={self.alpha_pattern!r} is not used by AdaLoRA, whose "
                                   "layers all scale by lora_alpha; remove it")
        for key, kept in (self.rank_pattern or {}).items():
            if len(kept) > self.init_r:
                raise ConfigError(f"AdaLoraConfig.rank_pattern[{key!r}] has {len(kept)} entries, more than "
                                  f"init_r={self.init_r}")

    def kept_ranks(self, module_name: str) -> list[bool] | None:
        """The ranks kept on the module at ``module_name`` (``None``: all ``init_r``)."""
        return (self.rank_pattern or {}).get(f"{module_name}.lora_E")


class AdaLoraLinear(LayerAdapter):
    """AdaLoRA on a linear layer (``nn.Linear``, ``Conv1D``, quantized linears).

    Attributes:
        lora_A / lora_E / lora_B: Q (r, in), Λ (r, 1), P (out, r).
        ranknum: (1,) the initial rank r₀, fixed.
        kept: (r,) bool, the ranks pruning kept (``None`` before pruning, and after a load that built only the kept
            ranks); a save writes only those.
    """

    def __init__(self, base_layer: nn.Module, r: int, init_r: int, alpha: float, dropout: float, init: bool,
                 fan_in_fan_out: bool) -> None:
        super().__init__()
        weight = get_weight(base_layer)
        out_features, in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
        self._build(weight, r, in_features, out_features, init_r, alpha, dropout, init)
        self.fan_in_fan_out = fan_in_fan_out

    def _build(self, weight: torch.Tensor, r: int, in_features: int, out_features: int, init_r: int, alpha: float,
               dropout: float, init: bool) -> None:
        """Q (r, in), Λ (r, 1), P (out, r), the scale, dropout and the pruning state."""
        kw = {"device": weight.device, "dtype": _adapter_dtype(weight)}
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **kw))
        self.lora_E = nn.Parameter(torch.empty(r, 1, **kw))
        with torch.no_grad():
            if init:
                nn.init.normal_(self.lora_A, std=0.02)
                nn.init.zeros_(self.lora_E)
                nn.init.normal_(self.lora_B, std=0.02)
            else:  # every part random: the adapter changes the output from the start (for tests)
                for param in (self.lora_A, self.lora_E, self.lora_B):
                    nn.init.normal_(param)
        # r₀ as a fixed parameter, as the ecosystem holds it (``ranknum.<adapter>`` in memory; never saved or trained)
        self.ranknum = nn.Parameter(torch.full((1,), float(init_r), device=kw["device"]), requires_grad=False)
        self.frozen_parameters: tuple[str, ...] = ("ranknum",)
        self.scale = (alpha if alpha > 0 else float(init_r)) / (init_r + _EPS)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.kept: torch.Tensor | None = None
        self.importance: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (Ī, Ū), not saved

    def delta_weight(self) -> torch.Tensor:
        """s/(r₀+ε) · P (Λ ⊙ Q) as (out, in)."""
        return (self.lora_B @ (self.lora_A * self.lora_E)) * self.scale

    # The update is LoRA's with A = Λ ⊙ Q and B = P, so LoRA's fused kernels compute it (kernels/lora.py): the base
    # matmul and the update in one autograd node, and dropout from a seed instead of a saved dropped copy of x.
    def _pair(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.lora_A * self.lora_E).to(dtype), self.lora_B.to(dtype)  # (r, in), (out, r)

    def _dropout_p(self) -> float:
        dropout = self._modules["lora_dropout"]
        return dropout.p if (self.training and isinstance(dropout, nn.Dropout)) else 0.0

    def fused_forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor | None:
        """``base_layer(x)`` plus this adapter in one node, or ``None`` where that would not be exact."""
        if not can_fuse(base_layer, x):
            return None
        p = self._dropout_p()
        if p > 0.0 and not can_seed_dropout(x):
            return None
        a, b = self._pair(x.dtype)
        weight, bias = base_layer._parameters["weight"], base_layer._parameters["bias"]
        transposed = type(base_layer) is not nn.Linear
        return FusedLoraLinear.apply(x, weight, bias, a, b, self.scale, p, draw_seed() if p > 0.0 else 0, transposed)

    def forward(self, x: torch.Tensor, y: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        a, b = self._pair(x.dtype)
        p = self._dropout_p()
        if p > 0.0 and can_seed_dropout(x):
            return LoraUpdate.apply(x, y, a, b, self.scale, p, draw_seed())
        h = F.linear(self.lora_dropout(x), a)  # (..., r)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=self.scale)
        return out.view(y.shape)

    def merge(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        delta = self.delta_weight().detach()
        return weight.add_((delta.T if self.fan_in_fan_out else delta).to(weight.dtype))

    def unmerge(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        delta = self.delta_weight().detach()
        return weight.sub_((delta.T if self.fan_in_fan_out else delta).to(weight.dtype))

    # ------------------------------------------------------------------ save / load of the kept ranks
    def saved_tensors(self) -> dict[str, torch.Tensor]:
        if self.kept is None or bool(self.kept.all()):
            return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_E": self.lora_E}
        kept = self.kept.to(self.lora_A.device)
        return {"lora_A": self.lora_A[kept], "lora_B": self.lora_B[:, kept], "lora_E": self.lora_E[kept]}

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take saved tensors: the full ranks, or (while pruned) the kept ranks, the others set to Λ = 0."""
        with torch.no_grad():
            if self.kept is None or bool(self.kept.all()):
                for key, src in tensors.items():
                    live = getattr(self, key)
                    live.copy_(src.to(device=live.device, dtype=live.dtype))
                return
            kept = self.kept.to(self.lora_A.device)
            for key, src in tensors.items():
                live = getattr(self, key)
                src = src.to(device=live.device, dtype=live.dtype)
                if key == "lora_B":
                    live[:, kept] = src
                else:
                    live[kept] = src
            self.lora_E[~kept] = 0.0

    # ------------------------------------------------------------------ importance
    def update_importance(self, beta1: float, beta2: float) -> None:
        """Fold this step's sensitivity |w · ∂L/∂w| into the smoothed importance and uncertainty."""
        with torch.no_grad():
            for name in ("lora_A", "lora_E", "lora_B"):
                param = getattr(self, name)
                if param.grad is None:
                    raise UsageError(
                        "AdaLoRA's update_and_allocate() found no gradient on its weights: call it after "
                        "loss.backward() and before optimizer.zero_grad() (graftkit.Trainer calls it itself)"
                    )
                sensitivity = (param * param.grad).abs()
                mean, spread = self.importance.get(name, (torch.zeros_like(param), torch.zeros_like(param)))
                mean = beta1 * mean + (1 - beta1) * sensitivity
                spread = beta2 * spread + (1 - beta2) * (sensitivity - mean).abs()
                self.importance[name] = (mean, spread)

    def rank_scores(self) -> torch.Tensor:
        """(r,) importance of each rank: S(Λᵢ) + mean S(Qᵢ·) + mean S(P·ᵢ)."""
        score = {name: mean * spread for name, (mean, spread) in self.importance.items()}
        return score["lora_E"].view(-1) + score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0)

    def orthogonality(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖Q Qᵀ − I‖_F, ‖PᵀP − I‖_F)."""
        a, b = self.lora_A, self.lora_B
        eye = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)
        return torch.linalg.matrix_norm(a @ a.T - eye), torch.linalg.matrix_norm(b.T @ b - eye)


class AdaLoraConv2d(AdaLoraLinear):
    """AdaLoRA on an ``nn.Conv2d``: Q is (r, in/groups · kh · kw), P is (out, r), and the update
    s/(r₀+ε) · P (Λ ⊙ Q), reshaped to the kernel's shape, is convolved with the input the way the base layer
    convolves (stride, padding and its mode, dilation, groups). Pruning, saving and the penalty are AdaLoRA's."""

    def __init__(self, base_layer: nn.Conv2d, r: int, init_r: int, alpha: float, dropout: float, init: bool) -> None:
        nn.Module.__init__(self)
        weight = base_layer.weight  # (out, in/groups, kh, kw)
        self._build(weight, r, weight[0].numel(), weight.shape[0], init_r, alpha, dropout, init)
        self.fan_in_fan_out = False

    def fused_forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor | None:
        return None

    def forward(self, x: torch.Tensor, y: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        delta = self.delta_weight().to(x.dtype).reshape(base_layer.weight.shape)  # (out, in/groups, kh, kw)
        return y + base_layer._conv_forward(self.lora_dropout(x), delta, None)

    def merge(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return weight.add_(self.delta_weight().detach().reshape(weight.shape).to(weight.dtype))

    def unmerge(self, weight: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return weight.sub_(self.delta_weight().detach().reshape(weight.shape).to(weight.dtype))


def _layers(model: nn.Module, adapter_name: str) -> list[tuple[str, AdaLoraLinear]]:
    """(module path, AdaLoRA adapter) of every layer adapter ``adapter_name`` adapts, in model order."""
    from ..model import wrappers  # the model module imports the registry, which imports the methods

    found = []
    for path, module in wrappers(model):
        if isinstance(module, AdaptedLayer) and isinstance(module.adapters.get(adapter_name), AdaLoraLinear):
            found.append((path, module.adapters[adapter_name]))
    return found


def _budget(config: AdaLoraConfig, step: int, initial: int, target: int) -> tuple[int, bool]:
    """(rank budget at ``step``, whether to prune at this step): the cubic schedule of the paper."""
    if step <= config.tinit:
        return initial, False
    if step > config.total_step - config.tfinal:
        return target, True
    progress = 1 - (step - config.tinit) / (config.total_step - config.tfinal - config.tinit)
    return int((initial - target) * progress ** 3 + target), step % config.deltaT == 0


@register
class AdaLora(Method):
    peft_type = PeftType.ADALORA.value
    config_class = AdaLoraConfig
    default_targets: ClassVar[dict[str, list[str]]] = {
        **Lora.default_targets,
        "t5": ["q", "k", "v", "o", "wi", "wo"],
        "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
        "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
        "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    }

    @classmethod
    def supported_layers(cls) -> str:
        return "nn.Linear, transformers Conv1D, bitsandbytes 4/8-bit linears, nn.Conv2d"

    @classmethod
    def check_new_adapter(cls, config: AdaLoraConfig, others: list) -> None:
        check_one_bias(config, others)

    @classmethod
    def attach(cls, model: nn.Module, config: AdaLoraConfig, adapter_name: str) -> None:
        if config.rank_pattern:  # a key naming no target would leave that layer at full rank, silently
            from ..inject import find_targets

            targets = set(find_targets(model, config))
            unknown = sorted(k for k in config.rank_pattern if not (k.endswith(".lora_E") and k[:-7] in targets))
            if unknown:
                raise ConfigError(f"AdaLoraConfig.rank_pattern names {len(unknown)} layer(s) the adapter does not "
                                  f"target, e.g. {unknown[:3]}; keys are '<module path>.lora_E' of targeted modules "
                                  f"(such as {sorted(targets)[:1]})")
        return super().attach(model, config, adapter_name)

    @classmethod
    def _rank(cls, config: AdaLoraConfig, module_name: str) -> int:
        kept = config.kept_ranks(module_name)
        return config.init_r if kept is None else sum(bool(k) for k in kept)

    @classmethod
    def adapter_shapes(cls, base_layer: nn.Module, config: AdaLoraConfig, module_name: str) -> dict[str, tuple] | None:
        if isinstance(base_layer, nn.Conv2d):
            r = cls._rank(config, module_name)
            return {"lora_A": (r, base_layer.weight[0].numel()), "lora_E": (r, 1),
                    "lora_B": (base_layer.out_channels, r)}
        features = linear_features(base_layer)
        if features is None:
            return None
        fan_in, fan_out = features
        r = cls._rank(config, module_name)
        return {"lora_A": (r, fan_in), "lora_E": (r, 1), "lora_B": (fan_out, r)}

    @classmethod
    def create_adapter(cls, base_layer: nn.Module, config: AdaLoraConfig, module_name: str) -> nn.Module | None:
        kind = type(base_layer).__name__
        if isinstance(base_layer, nn.Conv2d):
            return AdaLoraConv2d(base_layer, cls._rank(config, module_name), config.init_r, config.lora_alpha,
                                 config.lora_dropout, bool(config.init_lora_weights))
        if isinstance(base_layer, nn.Embedding):
            return None
        if isinstance(base_layer, nn.Linear) or kind == "Conv1D" or hasattr(base_layer, "in_features"):
            return AdaLoraLinear(base_layer, cls._rank(config, module_name), config.init_r, config.lora_alpha,
                                 config.lora_dropout, bool(config.init_lora_weights), kind == "Conv1D")
        return None

    @classmethod
    def restore_state(cls, model: nn.Module, config: AdaLoraConfig, adapter_name: str) -> None:
        """Point each full-size layer's kept ranks at ``config.rank_pattern`` (a checkpoint loaded mid-training)."""
        for path, layer in _layers(model, adapter_name):
            kept = config.kept_ranks(path)
            full = kept is not None and len(kept) == layer.lora_E.shape[0]
            layer.kept = torch.tensor(kept, dtype=torch.bool, device=layer.lora_E.device) if full else None

    @classmethod
    def training_state(cls, model: nn.Module, config: AdaLoraConfig, adapter_name: str) -> dict[str, torch.Tensor]:
        """The smoothed importance and uncertainty of every weight (a resumed run continues the same schedule)."""
        out = {}
        for path, layer in _layers(model, adapter_name):
            for name, (mean, spread) in layer.importance.items():
                out[f"{path}.{name}.importance"] = mean
                out[f"{path}.{name}.uncertainty"] = spread
            if layer.kept is not None and not bool(layer.kept.all()):
                # The adapter files hold the kept ranks only; the pruned ones keep training (and may come back at
                # the next pruning step), so a resumed run needs them too.
                for name in ("lora_A", "lora_E", "lora_B"):
                    out[f"{path}.{name}.full"] = getattr(layer, name).detach()
        return out

    @classmethod
    def load_training_state(cls, model: nn.Module, config: AdaLoraConfig, adapter_name: str,
                            tensors: dict[str, torch.Tensor]) -> None:
        layers = dict(_layers(model, adapter_name))
        loaded: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            head, kind = key.rsplit(".", 1)
            path, name = head.rsplit(".", 1)
            layer = layers.get(path)
            param = getattr(layer, name, None) if layer is not None else None
            if not isinstance(param, nn.Parameter) or kind not in ("importance", "uncertainty", "full") or \
                    tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"AdaLoRA training state '{key}' does not fit adapter '{adapter_name}' (shape "
                                      f"{tuple(value.shape)}); resume with the model this checkpoint was trained on")
            loaded.setdefault((path, name), {})[kind] = value.to(device=param.device, dtype=param.dtype)
        for (path, name), parts in loaded.items():
            if "importance" in parts and "uncertainty" in parts:
                layers[path].importance[name] = (parts["importance"], parts["uncertainty"])
            if "full" in parts:
                with torch.no_grad():
                    getattr(layers[path], name).copy_(parts["full"])

    @classmethod
    def regularization(cls, model: nn.Module, config: AdaLoraConfig, adapter_name: str) -> torch.Tensor | None:
        """``orth_reg_weight`` × the mean orthogonality residual of every P and Q."""
        if config.orth_reg_weight == 0:
            return None
        norms = [n for _, layer in _layers(model, adapter_name) for n in layer.orthogonality()]
        if not norms:
            return None
        return config.orth_reg_weight * torch.stack(norms).mean()

    @classmethod
    def update_and_allocate(cls, model: nn.Module, config: AdaLoraConfig, adapter_name: str, global_step: int) -> None:
        """One step of the rank schedule (call after ``loss.backward()``, before ``zero_grad()``).

        Before ``total_step - tfinal``: update the importance scores and, on pruning steps, set Λ to zero for the
        lowest-scored ranks down to the step's budget. At ``total_step - tfinal``: prune to the final budget and fix
        ``rank_pattern``. After it: keep the pruned ranks at zero.
        """
        layers = _layers(model, adapter_name)
        if not layers:
            return
        final = config.total_step - config.tfinal
        if global_step < final:
            for _, layer in layers:
                layer.update_importance(config.beta1, config.beta2)
        if global_step <= final:
            initial = sum(layer.lora_A.shape[0] for _, layer in layers)
            budget, prune = _budget(config, global_step, initial, config.target_r * len(layers))
            if prune or global_step == final:
                cls._prune(layers, config, initial - budget)
            if global_step == final:
                for _, layer in layers:
                    layer.importance.clear()
            return
        if config.rank_pattern is None:
            raise CheckpointError("AdaLoRA: the pruning phase is over but rank_pattern is empty; was "
                                  "update_and_allocate() called during the budget phase?")
        with torch.no_grad():
            for path, layer in layers:
                kept = config.kept_ranks(path)
                if kept is not None and len(kept) == layer.lora_E.shape[0]:
                    mask = torch.tensor(kept, dtype=torch.bool, device=layer.lora_E.device)
                    layer.lora_E[~mask] = 0.0

    @classmethod
    def _prune(cls, layers: list[tuple[str, AdaLoraLinear]], config: AdaLoraConfig, drop: int) -> None:
        """Zero Λ for the ``drop`` lowest-scored ranks (ties at the threshold go too) and record ``rank_pattern``."""
        if drop <= 0:
            return
        scores = [layer.rank_scores() for _, layer in layers]
        threshold = torch.kthvalue(torch.cat(scores), k=drop).values.item()
        pattern: dict[str, list[bool]] = {}
        with torch.no_grad():
            for (path, layer), score in zip(layers, scores):
                kept = score > threshold
                layer.lora_E[~kept] = 0.0
                layer.kept = kept
                pattern[f"{path}.lora_E"] = kept.tolist()
        config.rank_pattern = pattern
