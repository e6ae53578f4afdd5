"""A fused LoRA linear: the base matmul and the low-rank update in one autograd node.

::

    forward :  y  = x Wᵀ + b            (addmm)
               h  = x Aᵀ                (N, r), kept for backward
               y += s · h Bᵀ            (addmm epilogue, in place)
    backward:  dh = s · g B             (N, r)
               dx = g W + dh A          (one (N, in) buffer: the LoRA term is accumulated into the base term)
               dA = dhᵀ x ;  dB = s · gᵀ h ;  db = Σ g   (only what requires grad)

Autograd on the plain path builds five nodes per adapted layer and sums two (N, in) input gradients in a
third buffer; this saves that buffer and pass, and skips ``dx`` entirely when the input needs no grad. It
saves only x (the input itself), h and the weights.

Used only where it is exact: a plain ``nn.Linear`` base with no hooks and a frozen weight, LoRA without DoRA,
dropout inactive, matching dtypes, no autocast. Everything else takes the plain path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ENABLED = True  # tests flip this to compare against the plain path


class FusedLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scaling: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        y = F.linear(x2, weight, bias)  # (N, out)
        h = torch.mm(x2, a.t())  # (N, r)
        y.addmm_(h, b.t(), alpha=scaling)
        # x itself, not x2: reshaping a non-contiguous x copies it, and that copy must not outlive the forward.
        ctx.save_for_backward(x, weight, a, b, h)
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, a, b, h = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        need_x, _, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        dh = torch.mm(g, b).mul_(s) if (need_x or need_a) else None  # (N, r)
        dx = torch.mm(g, weight).addmm_(dh, a).view(ctx.x_shape) if need_x else None
        da = torch.mm(dh.t(), x.reshape(-1, x.shape[-1])) if need_a else None  # (r, in)
        db = torch.mm(g.t(), h).mul_(s) if need_b else None  # (out, r)
        dbias = g.sum(0) if (need_bias and ctx.has_bias) else None
        return dx, None, dbias, da, db, None


def can_fuse(base: nn.Module, x: torch.Tensor) -> bool:
    """Whether the fused path computes exactly what ``base(x)`` + LoRA would."""
    if not ENABLED or type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
        return False
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    if torch.is_autocast_enabled(x.device.type):  # autocast recasts ops one by one; the plain path follows it
        return False
    return not base.weight.requires_grad and base.weight.dtype == x.dtype
