"""DeferrableLinear: a plain (FP32/BF16) nn.Linear whose weight gradient can be deferred to a W step.

Same numerics as nn.Linear (under autocast: operands cast to the autocast dtype, as F.linear would);
only the backward is written out so that dW = G^T X can be queued in a WeightGradStore while
dX = G W is returned at once. Zero-bubble schedules need this split for non-FP8 runs too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from moeforge.kernels.compute_dtype import autocast_off, compute_dtype
from moeforge.kernels.swappable import SwappableLinear
from moeforge.kernels.wgrad_store import deferred_or_now


class _DeferrableLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        dtype = compute_dtype(x)
        with autocast_off(x):
            x_c = x.to(dtype)
            y = F.linear(x_c, weight.to(dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x_c, weight)
        ctx.param = weight  # the parameter itself: see fp8_linear._FP8LinearFunction.backward
        ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x_c, _ = ctx.saved_tensors
        weight = ctx.param
        with autocast_off(grad_out):
            g = grad_out.to(x_c.dtype)
            dx = (g @ weight.to(x_c.dtype)).to(ctx.x_dtype)
            g2, x2 = g.reshape(-1, g.shape[-1]), x_c.reshape(-1, x_c.shape[-1])  # [T, N], [T, K]
            dw = deferred_or_now(weight, lambda: (g2.t() @ x2).to(weight.dtype)) if ctx.needs_input_grad[1] else None
            db = g2.float().sum(0) if ctx.has_bias else None
        return dx, dw, db


def deferrable_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear whose weight gradient honours an active WeightGradStore."""
    return _DeferrableLinearFunction.apply(x, weight, bias)


class DeferrableLinear(SwappableLinear):
    """Drop-in nn.Linear (same parameters, names and shapes) computing with deferrable_linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return deferrable_linear(x, self.weight, self.bias)
