"""Combining several task updates into one: task arithmetic, TIES, DARE and magnitude pruning.

Each function takes the updates of n tasks (tensors of one shape) and one weight per task:

* ``linear``          Σ wᵢ·tᵢ                                            (task arithmetic)
* ``magnitude_prune`` Σ wᵢ·top_k(tᵢ)             keep the ``density`` share of largest |entries| per task
* ``ties``            top-k per task, elect a sign per entry from the pruned tasks (sum of values, or count
                      of signs), then average the weighted entries that agree with it (Yadav et al. 2023)
* ``dare_linear``     Σ wᵢ·(mᵢ⊙tᵢ)/density       mᵢ ~ Bernoulli(density) per entry (Yu et al. 2023)
* ``dare_ties``       DARE's random drop and rescale, then TIES's sign election and disjoint mean

Random masks draw from torch's global generator, task by task in order, so a seeded run is reproducible.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from .errors import ConfigError

COMBINATIONS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def _keep_largest(t: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[torch.topk(t.abs().flatten(), k=k, largest=True).indices] = 1
    return t * mask.view(t.shape)


def _drop_random(t: torch.Tensor, density: float) -> torch.Tensor:
    return t * torch.bernoulli(torch.full_like(t, density)) / density


def _prune(t: torch.Tensor, density: float, random: bool) -> torch.Tensor:
    if density >= 1:
        warnings.warn(f"density={density} >= 1: nothing is pruned", stacklevel=3)
        return t
    if density < 0:
        raise ConfigError(f"density must be in [0, 1], got {density}")
    return _drop_random(t, density) if random else _keep_largest(t, density)


def _agreeing_mean(
    stacked: torch.Tensor, weighted: torch.Tensor, method: Literal["total", "frequency"]
) -> torch.Tensor:
    """Mean over tasks (dim 0) of the weighted entries whose sign agrees with the sign elected by the
    (unweighted) task tensors."""
    signs = stacked.sign()
    if method == "total":
        votes = stacked.sum(dim=0)
    elif method == "frequency":
        votes = signs.sum(dim=0)
    else:
        raise ConfigError(f"majority_sign_method must be 'total' or 'frequency', got {method!r}")
    elected = torch.where(votes >= 0, 1, -1)
    agree = signs == elected
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1.0)


def combine(
    tensors: list[torch.Tensor],
    weights: list[float] | torch.Tensor,
    combination: str,
    density: float | None = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> torch.Tensor:
    """Combine task tensors (see the module docstring).

    Raises:
        ConfigError: an unknown combination, or a pruning combination without ``density``.
    """
    if combination not in COMBINATIONS:
        raise ConfigError(f"unknown combination {combination!r}; expected one of {COMBINATIONS}")
    if combination != "linear":
        if density is None:
            raise ConfigError(f"combination_type={combination!r} needs density (the share of entries kept, 0..1)")
        tensors = [_prune(t, density, random=combination.startswith("dare")) for t in tensors]
    stacked = torch.stack(tensors)  # (n, ...)
    w = torch.as_tensor(weights, dtype=stacked.dtype, device=stacked.device)
    weighted = stacked * w.view(-1, *([1] * (stacked.dim() - 1)))
    if combination.endswith("ties"):
        return _agreeing_mean(stacked, weighted, majority_sign_method)
    return weighted.sum(dim=0)
