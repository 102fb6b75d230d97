"""RMSNorm, computed in fp32 whatever the activation dtype (as the published model does).

Backward keeps only what it cannot cheaply recompute: the input, in its own dtype (BF16 in the
residual stream under mixed precision), and one FP32 reciprocal RMS per row. The normalised output
is recomputed in backward rather than saved, as DeepSeek-V3 recomputes its RMSNorms: saving the
FP32 intermediates autograd would keep costs 2-3x the BF16 input per norm.
"""

from __future__ import annotations

import torch
from torch import nn


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
        ctx.save_for_backward(x, weight, rstd)
        # Cast back before the weight multiply: that is the rounding order of the reference model.
        return weight.to(x.dtype) * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        x32, g = x.float(), grad_out.float()
        normed = x32 * rstd  # [..., dim]
        grad_weight = (g * normed.to(x.dtype).float()).flatten(0, -2).sum(0).to(weight.dtype)
        gw = g * weight.float()
        # d/dx of x * rstd(x): rstd * (gw - normed * mean(gw * normed))
        grad_x = rstd * (gw - normed * (gw * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), normalising over the last dimension; y has x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
