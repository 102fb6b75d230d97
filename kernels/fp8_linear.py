"""FP8Linear: nn.Linear whose three GEMMs (forward, input gradient, weight gradient) run in e4m3.

The DeepSeek-V3 recipe, per GEMM (Y = X W^T, X [T, K], W [N, K], G = dL/dY [T, N]):

    forward  Y  = X  W^T     X: 1x128 tiles along K       W: 128x128 blocks
    dgrad    dX = G  W       G: 1x128 tiles along N       W^T: the same blocks, transposed
    wgrad    dW = G^T X      G^T, X^T: 1x128 tiles along the tokens T (the contraction dimension)

The master weight stays an FP32 parameter and is quantized on the fly. The activation is saved for
backward only as FP8 X^T with its scales (~1.03 bytes per element instead of 2 for BF16), quantized
in the forward pass by the fused transpose kernel. K and N that are not multiples of 128 are
padded with zeros on both operands consistently (zero rows/columns add nothing to any product), and
the results sliced back. The weight gradient may be deferred to a W step (wgrad_store.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from moeforge.kernels.compute_dtype import autocast_off, compute_dtype
from moeforge.kernels.fp8_format import BLOCK, round_up
from moeforge.kernels.gemm import fp8_gemm
from moeforge.kernels.quant import act_quant, act_quant_transpose, weight_quant
from moeforge.kernels.swappable import SwappableLinear
from moeforge.kernels.wgrad_store import deferred_or_now


def pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the last dimension of x up to `size` (no copy when it already fits)."""
    return x if x.shape[-1] == size else F.pad(x, (0, size - x.shape[-1]))


def pad_rows(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad dimension -2 of x up to `size`."""
    return x if x.shape[-2] == size else F.pad(x, (0, 0, 0, size - x.shape[-2]))


def quantize_weight(weight: torch.Tensor, transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Master weight [..., N, K] -> e4m3 padded to [..., N, Kp] with block scales (forward operand),
    or, transposed, W^T [..., Kp, Np] with the transposed scales (input-gradient operand): a 128x128
    block's scale is the same whichever way the block is read."""
    n, k = weight.shape[-2:]
    if not transposed:
        return weight_quant(pad_last(weight, round_up(k, BLOCK)))
    w_pad = pad_rows(pad_last(weight, round_up(k, BLOCK)), round_up(n, BLOCK))  # [..., Np, Kp]
    q, s = weight_quant(w_pad)
    return q.transpose(-1, -2).contiguous(), s.transpose(-1, -2).contiguous()


class _FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, keep_for_wgrad: bool):
        out_dtype = compute_dtype(x)
        with autocast_off(x):
            n, k = weight.shape
            kp = round_up(k, BLOCK)
            x2 = pad_last(x.reshape(-1, k), kp)  # [T, Kp]
            y = fp8_gemm(*act_quant(x2), *quantize_weight(weight), out_dtype=out_dtype)  # [T, N]
            if bias is not None:
                y = y + bias.to(out_dtype)
            # [Kp, T_pad]: what wgrad needs, in FP8 (skipped when no weight gradient can follow)
            x_t, x_t_scales = act_quant_transpose(x2) if keep_for_wgrad else (None, None)
        ctx.save_for_backward(x_t, x_t_scales, weight)
        ctx.x_shape, ctx.x_dtype, ctx.has_bias = x.shape, x.dtype, bias is not None
        return y.reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x_t, x_t_scales, weight = ctx.saved_tensors
        n, k = weight.shape
        with autocast_off(grad_out):
            g = grad_out.reshape(-1, n)  # [T, N]
            g_q, g_s = act_quant(pad_last(g, round_up(n, BLOCK)))  # tiles along N: dgrad's K
            w_t, w_t_scales = quantize_weight(weight, transposed=True)  # [Kp, Np]
            dx = fp8_gemm(g_q, g_s, w_t, w_t_scales, out_dtype=ctx.x_dtype)[:, :k].reshape(ctx.x_shape)
            dw = None
            if x_t is not None:
                g_t, g_t_scales = act_quant_transpose(g)  # [N, T_pad]: tiles along tokens, quantized now

                def weight_gradient() -> torch.Tensor:
                    return fp8_gemm(g_t, g_t_scales, x_t, x_t_scales, out_dtype=torch.float32)[:, :k].contiguous()

                dw = deferred_or_now(weight, weight_gradient)
            db = g.float().sum(0) if ctx.has_bias else None
        return dx, dw, db, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with FP8 GEMMs in forward and backward (see the module docstring)."""
    return _FP8LinearFunction.apply(x, weight, bias, torch.is_grad_enabled() and weight.requires_grad)


class FP8Linear(SwappableLinear):
    """Drop-in nn.Linear (same parameters, names and shapes) computing with fp8_linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias)
