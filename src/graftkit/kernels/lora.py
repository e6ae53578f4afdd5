"""Fused LoRA autograd Functions: the low-rank update (and, where it can, the base matmul) in one node.

::

    forward :  y  = x Wᵀ + b            (addmm; W stored (in, out) for Conv1D: y = x W + b)
               x̃  = x ⊙ M               (dropout mask M from a seed; x̃ = x without dropout)
               h  = x̃ Aᵀ                (N, r), kept for backward
               y += s' · h Bᵀ           (addmm epilogue, in place; s' = s / keep-probability)
    backward:  dh = s' · g B            (N, r)
               dx = g W + (dh A) ⊙ M    (one (N, in) buffer: the LoRA term is accumulated into the base term)
               dA = dhᵀ x̃ ;  dB = s' · gᵀ h ;  db = Σ g   (only what requires grad)

Autograd on the plain path builds five nodes per adapted layer and adds the LoRA input gradient to the
base's in a pass of its own; ``FusedLoraLinear`` accumulates it into the base GEMM's result, and skips ``dx``
entirely when the input needs none. It saves only x (the input itself), h and the weights. On CPU the two
paths measure within a few percent of each other at training sizes (benchmarks/); the node matters for
seeded dropout, below.

Dropout is drawn from a seed, not kept: the forward draws the mask, uses it and drops it; the backward draws
the same mask again from the same seed. So dropout costs no saved activation (a plain ``nn.Dropout`` keeps a
dropped copy of every adapted input alive until backward). The mask comes from 16-bit uniform integers, four
per 64-bit draw: torch's own CPU dropout spends most of a LoRA step's dropout time in its random number
generator, and this draws a quarter of the words. It is applied as 0/1 values in the activation dtype.
The drop probability is therefore ``p`` rounded to a multiple of 1/65536 (0.05 becomes 0.0500031); the kept
values are scaled by the inverse of the rounded keep probability, so the update stays unbiased. The seed
comes from torch's default CPU generator, so ``torch.manual_seed`` makes a run repeatable and activation
checkpointing (which restores that generator before recomputing) replays the same masks.

``FusedLoraLinear`` runs where it is exact: a plain ``nn.Linear`` or transformers ``Conv1D`` base with no
hooks and a frozen weight, LoRA without DoRA, matching dtypes, no autocast. ``LoraUpdate`` is the update
alone on top of any base output (quantized bases, hooks): used when dropout is active, where it spares the
saved dropped copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ENABLED = True  # tests flip this to compare against the plain path
_WORDS = 65536  # the mask compares 16-bit uniform integers with a threshold


def keep_probability(p: float) -> float:
    """The keep probability the seeded mask really has: ``1 - p`` with ``p`` rounded to a multiple of 1/65536."""
    return 1.0 - round(p * _WORDS) / _WORDS


def _lanes(shape: torch.Size | tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """Uniform int16 values of ``shape`` from ``seed``: four per 64-bit draw of a generator on ``device``."""
    numel = 1
    for size in shape:
        numel *= size
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None, generator=gen)
    return words.view(torch.int16)[:numel].view(shape)  # uniform over [-32768, 32767]


def dropout_mask(shape: torch.Size | tuple[int, ...], p: float, seed: int, device: torch.device,
                 dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """The keep mask that ``seed`` gives: True (or 1 in ``dtype``) where the input is kept.

    Each element is kept when a uniform 16-bit integer is at least the threshold, so it is dropped with
    probability ``round(p * 65536) / 65536``. Four elements share one 64-bit draw from a generator seeded
    with ``seed`` on ``device``. The fused path asks for 0/1 values in the activation dtype: multiplying by
    them (and ``addcmul``) is about three times faster on CPU than ``where`` on a bool mask, and the
    comparison writes them directly.
    """
    dropped = round(p * _WORDS)
    if dropped >= _WORDS:  # p rounds to 1 (the threshold would not fit in 16 bits): nothing is kept
        return torch.zeros(shape, dtype=dtype, device=device)
    lanes = _lanes(shape, seed, device)
    try:
        return torch.ge(lanes, dropped - _WORDS // 2, out=torch.empty(shape, dtype=dtype, device=device))
    except RuntimeError:  # a backend without mixed-dtype comparison outputs
        return (lanes >= dropped - _WORDS // 2).to(dtype)


def draw_seed() -> int:
    """A fresh mask seed from torch's default CPU generator (no device sync, repeatable under ``manual_seed``)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


def _dropped(x2: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x ⊙ M, or x itself without dropout."""
    if p <= 0.0:
        return x2
    return x2 * dropout_mask(x2.shape, p, seed, x2.device, x2.dtype)


def _update_scale(scaling: float, p: float) -> float:
    if p <= 0.0:
        return scaling
    q = keep_probability(p)
    return scaling / q if q > 0 else 0.0


def _lora_grads(ctx, g: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, h: torch.Tensor,
                need_x: bool, need_a: bool, need_b: bool, dx: torch.Tensor | None):
    """dA, dB, and the input gradient (the LoRA term accumulated into ``dx`` when it is given)."""
    s, p = ctx.scale, ctx.p
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    dh = torch.mm(g, b).mul_(s) if (need_x or need_a) else None  # (N, r)
    keep = dropout_mask(x2.shape, p, ctx.seed, x2.device, x2.dtype) if (p > 0.0 and (need_x or need_a)) else None
    if need_x:
        if keep is None:
            dx = torch.mm(dh, a) if dx is None else dx.addmm_(dh, a)
        else:
            dx = torch.mm(dh, a).mul_(keep) if dx is None else dx.addcmul_(torch.mm(dh, a), keep)
        dx = dx.view(ctx.x_shape)
    da = torch.mm(dh.t(), x2 if keep is None else x2 * keep) if need_a else None  # (r, in)
    db = torch.mm(h.t(), g).mul_(s).t() if need_b else None  # (out, r), computed as (r, out): gᵀ is the slow side
    return dx, da, db


class FusedLoraLinear(torch.autograd.Function):
    """``base(x) + s·dropout(x) Aᵀ Bᵀ`` for a plain linear base, in one node (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scaling: float, p: float, seed: int, transposed: bool) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        if transposed:  # Conv1D: weight is (in, out)
            y = torch.mm(x2, weight) if bias is None else torch.addmm(bias, x2, weight)
        else:
            y = F.linear(x2, weight, bias)  # (N, out)
        s = _update_scale(scaling, p)
        xd = _dropped(x2, p, seed)
        h = torch.mm(xd, a.t())  # (N, r)
        del xd  # the dropped copy dies here; backward draws the mask again
        y.addmm_(h, b.t(), alpha=s)
        # x itself, not x2: reshaping a non-contiguous x copies it, and that copy must not outlive the forward.
        ctx.save_for_backward(x, weight, a, b, h)
        ctx.scale, ctx.p, ctx.seed, ctx.transposed = s, p, seed, transposed
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, a, b, h = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        dx = (torch.mm(g, weight.t()) if ctx.transposed else torch.mm(g, weight)) if need_x else None
        dx, da, db = _lora_grads(ctx, g, x, a, b, h, need_x, need_a, need_b, dx)
        dbias = g.sum(0) if (need_bias and ctx.has_bias) else None
        return dx, None, dbias, da, db, None, None, None, None


class LoraUpdate(torch.autograd.Function):
    """``y + s·dropout(x) Aᵀ Bᵀ`` on top of any base output ``y``, with the dropout mask drawn from a seed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                p: float, seed: int) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        s = _update_scale(scaling, p)
        xd = _dropped(x2, p, seed)
        h = torch.mm(xd, a.t())  # (N, r)
        del xd
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h, b.t(), alpha=s)  # (N, out)
        ctx.save_for_backward(x, a, b, h)
        ctx.scale, ctx.p, ctx.seed = s, p, seed
        ctx.x_shape = x.shape
        return out.view(y.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, a, b, h = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        need_x, need_y, need_a, need_b = ctx.needs_input_grad[:4]
        dx, da, db = _lora_grads(ctx, g, x, a, b, h, need_x, need_a, need_b, None)
        return dx, (grad if need_y else None), da, db, None, None, None


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks)


def _is_transformers_conv1d(module: nn.Module) -> bool:
    kind = type(module)
    return kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers.")


def can_fuse(base: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``FusedLoraLinear`` computes exactly what ``base(x)`` + LoRA would."""
    if not ENABLED or _hooked(base):
        return False
    if type(base) is not nn.Linear and not _is_transformers_conv1d(base):
        return False
    if torch.is_autocast_enabled(x.device.type):  # autocast recasts ops one by one; the plain path follows it
        return False
    weight = base._parameters["weight"]
    return weight is not None and not weight.requires_grad and weight.dtype == x.dtype


def can_seed_dropout(x: torch.Tensor) -> bool:
    """Whether seeded dropout can run here: CPU or CUDA, and not while ``torch.compile`` traces (drawing a seed
    reads a number back to Python, a graph break; compiled graphs use ``nn.Dropout``), and not under autocast
    (it recasts ops one by one, so the saved activations and the backward's gradients would disagree in dtype;
    the plain path follows autocast)."""
    return (ENABLED and x.device.type in ("cpu", "cuda") and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled(x.device.type))
