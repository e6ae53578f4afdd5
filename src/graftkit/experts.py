"""Running transformers' fused mixture-of-experts blocks with per-expert additive terms, at a cost that follows the
tokens each expert sees.

transformers 5 stores the experts of Mixtral, the Qwen-MoE family and others as 3-D parameters (``gate_up_proj``
(E, 2·ff, d) or ``up_proj``, and ``down_proj`` (E, d, ff); (E, in, out) when ``is_transposed``) on a module class
decorated with ``use_experts_implementation``, which sets ``has_gate``, ``has_bias``, ``is_transposed``,
``has_post_expert_norm`` and ``_apply_gate`` on it. An adapter that changes expert weights could substitute
W + ΔW for the whole (E, out, in) tensor each forward, but that costs E·out·in whatever the batch. This module instead
runs the block itself, token-expert pairs sorted by expert, one grouped GEMM per projection, and asks the adapter for
an additive term on the same sorted pairs (``extra(name, x, pairs) -> (S, out)``), so the adapter's work is
proportional to the tokens routed to each expert too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_CONTRACT = ("has_gate", "has_bias", "is_transposed", "num_experts")


def fused_experts(module: nn.Module) -> tuple[str, str] | None:
    """``(up, down)``: the names of the module's two expert parameters when it follows transformers' fused experts
    contract (and is not sharded across devices by expert parallelism), else ``None``."""
    if not all(hasattr(module, a) for a in _CONTRACT) or getattr(module, "_is_expert_parallel", False):
        return None
    up = "gate_up_proj" if module.has_gate else "up_proj"
    params = module._parameters
    if not isinstance(params.get(up), torch.Tensor) or not isinstance(params.get("down_proj"), torch.Tensor):
        return None
    if params[up].dim() != 3 or params["down_proj"].dim() != 3:
        return None
    return up, "down_proj"


@dataclass
class Pairs:
    """The (token, expert) pairs of one forward, sorted by expert.

    Attributes:
        token: (S,) the token row each pair reads.
        expert: (S,) its expert, ascending.
        offsets: (E,) int32 running count of pairs per expert (the grouped GEMM's group ends).
        num_experts: E.
    """

    token: torch.Tensor
    expert: torch.Tensor
    offsets: torch.Tensor
    num_experts: int

    def subset(self, rows: torch.Tensor) -> Pairs:
        """The pairs at ``rows`` (positions in this ordering), still sorted by expert."""
        expert = self.expert.index_select(0, rows)
        return Pairs(self.token.index_select(0, rows), expert, group_offsets(expert, self.num_experts),
                     self.num_experts)


def group_offsets(expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.bincount(expert, minlength=num_experts).cumsum(0).to(torch.int32)


def _grouped_kernel_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm") or x.dtype != w.dtype or x.dtype not in (torch.float32, torch.bfloat16,
                                                                             torch.float16):
        return False
    if w.device.type == "cuda":
        return w.dtype == torch.bfloat16 and torch.cuda.get_device_capability(w.device) >= (8, 0)
    return w.device.type == "cpu"


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (S, in), sorted by group, times their group's ``w`` (G, in, out) -> (S, out).

    One grouped GEMM where torch has a kernel for the dtype and device, else one GEMM per non-empty group."""
    if _grouped_kernel_fits(x, w):
        return F.grouped_mm(x, w, offs=offsets)
    ends = offsets.tolist()  # one device sync
    parts, start = [], 0
    for g, end in enumerate(ends):
        if end > start:
            parts.append(x[start:end] @ w[g])
        start = end
    if not parts:
        return x.new_zeros(x.shape[0], w.shape[-1])
    return torch.cat(parts)


def _split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(top_k_index, top_k_weights) from the experts forward's arguments after ``hidden_states``."""
    names = ("top_k_index", "top_k_weights")
    values = list(args[:2]) + [kwargs.get(n) for n in names[len(args[:2]):]]
    if len(args) > 2 or set(kwargs) - set(names) or any(not isinstance(v, torch.Tensor) for v in values):
        return None
    return values[0], values[1]


def run_experts(module: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict,
                extra: Callable[[str, torch.Tensor, Pairs], torch.Tensor | None]) -> torch.Tensor | None:
    """The experts block's output with ``extra(name, x_sorted, pairs)`` added to each projection's output (the
    projection's parameter name, its input rows sorted by expert). ``None`` when the module or the call does not
    follow the contract (the caller then runs it another way)."""
    names = fused_experts(module)
    routed = _split_call(args, kwargs)
    if names is None or routed is None or hidden.dim() != 2:
        return None
    up, down = names
    top_k_index, top_k_weights = routed
    k = top_k_index.shape[-1]
    expert, order = torch.sort(top_k_index.reshape(-1), stable=True)
    pairs = Pairs(order // k, expert, group_offsets(expert, module.num_experts), module.num_experts)

    def project(name: str, x: torch.Tensor) -> torch.Tensor:
        weight = getattr(module, name)
        w = weight if module.is_transposed else weight.transpose(-2, -1)  # (E, in, out)
        out = grouped_mm(x.to(w.dtype), w, pairs.offsets)
        if module.has_bias:
            out = out + getattr(module, f"{name}_bias").index_select(0, pairs.expert)
        more = extra(name, x, pairs)
        return out if more is None else out + more.to(out.dtype)

    h = project(up, hidden.index_select(0, pairs.token))
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    out = project(down, h)
    if getattr(module, "has_post_expert_norm", False):
        out = module.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1).index_select(0, order).unsqueeze(-1).to(out.dtype)
    out = torch.empty_like(out).index_copy(0, order, out)  # back to (token, k) order: a deterministic sum
    return out.view(hidden.shape[0], k, -1).sum(dim=1).to(hidden.dtype)
