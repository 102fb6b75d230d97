"""RMSNorm, computed in fp32 whatever the activation dtype (as the published model does).

Backward keeps only what it cannot cheaply recompute: the input, in its own dtype (BF16 in the
residual stream under mixed precision), and one FP32 reciprocal RMS per row. The normalised output
is recomputed in backward rather than saved, as DeepSeek-V3 recomputes its RMSNorms: saving the
FP32 intermediates autograd would keep costs 2-3x the BF16 input per norm.

V3 recomputes the norms so that their outputs are never stored, by anyone. A consumer whose backward
needs a norm's output (the MoE router's weight gradient) can ask `norm_inputs(t)` for what the norm
itself keeps (input, weight, reciprocal RMS) and rebuild the output with `norm_output` in its
backward, instead of keeping its own copy.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn


def norm_output(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """The RMSNorm output from its input, weight and reciprocal RMS (bit-identical to the forward)."""
    # Cast back before the weight multiply: that is the rounding order of the reference model.
    return weight.to(x.dtype) * (x.float() * rstd).to(x.dtype)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float):
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
        ctx.save_for_backward(x, weight, rstd)
        ctx.mark_non_differentiable(rstd)
        return norm_output(x, weight, rstd), rstd

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, _grad_rstd: torch.Tensor | None = None):
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
        y, rstd = _RMSNormFunction.apply(x, self.weight, self.eps)
        if torch.is_grad_enabled():
            _remember(y, (x, self.weight, rstd))
        return y

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


# Outputs of norms still alive in this forward -> what rebuilds them: keyed by the output's id,
# checked against a weak reference to it and its version, dropped when it is freed.
_INPUTS: dict[int, tuple[weakref.ref, int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}


def _remember(y: torch.Tensor, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    key = id(y)
    _INPUTS[key] = (weakref.ref(y), y._version, inputs)
    weakref.finalize(y, _INPUTS.pop, key, None)


def norm_inputs(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(input, weight, reciprocal RMS) of the RMSNorm whose unmodified output is `t`, or a reshape
    of it (`t` shares its storage, offset and element count); None for any other tensor."""
    for candidate in (t, t._base):
        entry = _INPUTS.get(id(candidate)) if candidate is not None else None
        if entry is None:
            continue
        ref, version, inputs = entry
        y = ref()
        if (
            y is candidate
            and y._version == version
            and t.numel() == y.numel()
            and t.is_contiguous()
            and y.is_contiguous()
            and t.storage_offset() == y.storage_offset()
        ):
            return inputs
    return None
