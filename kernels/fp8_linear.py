"""FP8Linear: nn.Linear whose three GEMMs (forward, input gradient, weight gradient) run in e4m3.

The DeepSeek-V3 recipe, per GEMM (Y = X W^T, X [T, K], W [N, K], G = dL/dY [T, N]):

    forward  Y  = X  W^T     X: 1x128 tiles along K       W: 128x128 blocks
    dgrad    dX = G  W       G: 1x128 tiles along N       W^T: the same blocks, transposed
    wgrad    dW = G^T X      G^T, X^T: 1x128 tiles along the tokens T (the contraction dimension)

The master weight stays an FP32 parameter; its FP8 copies (W and W^T) are made once per optimizer
step and reused by every micro-batch (`weight_cache.FP8WeightCache`). The activation is saved for
backward only as FP8 X^T with its scales (~1.03 bytes per element instead of 2 for BF16), quantized in
the forward pass by the fused transpose kernel; projections that read the same input share one
quantization and one saved copy (`shared_quant.shared_quantization`). K and N that are not multiples of
128 are padded with zeros on both operands consistently (zero rows/columns add nothing to any product),
and the results sliced back; the saved X^T keeps only the K real rows. Gradients are quantized with a
near-zero scale floor (fp8_format.GRAD_SCALE_FLOOR), so tiles of tiny gradients keep their range.
`scale_fmt="ue8m0"` gives the input power-of-two scales (V3 does this for the attention output
projection's input). The weight gradient may be deferred to a W step (`wgrad_store.WeightGradStore`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from moeforge.kernels.compute_dtype import autocast_off, compute_dtype
from moeforge.kernels.fp8_format import BLOCK, GRAD_SCALE_FLOOR, round_up, token_capacity
from moeforge.kernels.gemm import fp8_gemm
from moeforge.kernels.group_tables import GroupSizes, sizes_key
from moeforge.kernels.quant import act_quant, act_quant_transpose, weight_quant
from moeforge.kernels.shared_quant import shared_quantization
from moeforge.kernels.swappable import SwappableLinear
from moeforge.kernels.weight_cache import WEIGHT_CACHE
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
    block's scale is the same whichever way the block is read. Cached until the next optimizer
    step or in-place update of the weight (`weight_cache.FP8WeightCache`)."""
    return WEIGHT_CACHE.get(weight, transposed, _quantize_weight)


def _quantize_weight(weight: torch.Tensor, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = weight.shape[-2:]
    if not transposed:
        return weight_quant(pad_last(weight, round_up(k, BLOCK)))
    w_pad = pad_rows(pad_last(weight, round_up(k, BLOCK)), round_up(n, BLOCK))  # [..., Np, Kp]
    q, s = weight_quant(w_pad)
    return q.transpose(-1, -2).contiguous(), s.transpose(-1, -2).contiguous()


def quantize_input(x: torch.Tensor, k: int, scale_fmt: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> its 1x128-tile e4m3 copy [T, Kp] for the forward GEMM, shared by every
    projection reading the same x (`shared_quant.shared_quantization`)."""

    def quantize() -> tuple[torch.Tensor, torch.Tensor]:
        return act_quant(pad_last(x.reshape(-1, k), round_up(k, BLOCK)), scale_fmt=scale_fmt)

    return shared_quantization(x, ("act_quant", k, scale_fmt), quantize)


def wgrad_capacity(group_sizes: GroupSizes | None, rows: int) -> int | None:
    """The token width of a grouped weight-gradient operand: None (exact) for host sizes, the
    data-independent fp8_format.token_capacity for sizes held on the device (no host read)."""
    if group_sizes is None or isinstance(group_sizes, list):
        return None
    return token_capacity(rows, len(group_sizes))


def quantize_input_for_wgrad(
    x: torch.Tensor, k: int, scale_fmt: str | None, group_sizes: GroupSizes | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> X^T in e4m3 [K, T_pad] with tiles along the tokens (per group when
    `group_sizes` is given; T_pad = wgrad_capacity for sizes in a tensor), the weight-gradient
    operand; shared like `quantize_input`. K is not padded: it is this GEMM's free dimension, and
    padded rows would be zeros held until backward."""

    def quantize() -> tuple[torch.Tensor, torch.Tensor]:
        rows = x.reshape(-1, k)  # [T, K]
        return act_quant_transpose(rows, group_sizes=group_sizes, scale_fmt=scale_fmt,
                                   capacity=wgrad_capacity(group_sizes, rows.shape[0]))

    key = ("act_quant_transpose", k, scale_fmt, sizes_key(group_sizes))
    return shared_quantization(x, key, quantize)


class _FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        keep_for_wgrad: bool,
        scale_fmt: str | None,
    ):
        out_dtype = compute_dtype(x)
        with autocast_off(x):
            n, k = weight.shape
            y = fp8_gemm(*quantize_input(x, k, scale_fmt), *quantize_weight(weight), out_dtype=out_dtype)  # [T, N]
            if bias is not None:
                y = y + bias.to(out_dtype)
            # [K, T_pad]: what wgrad needs, in FP8 (skipped when no weight gradient can follow)
            x_t, x_t_scales = quantize_input_for_wgrad(x, k, scale_fmt) if keep_for_wgrad else (None, None)
        ctx.save_for_backward(x_t, x_t_scales, weight)
        ctx.param = weight
        ctx.x_shape, ctx.x_dtype, ctx.has_bias = x.shape, x.dtype, bias is not None
        return y.reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x_t, x_t_scales, _ = ctx.saved_tensors  # unpacking the weight checks it was not modified
        # The parameter object itself, not the unpacked copy: under activation recomputation
        # (`platform.recompute.apply_recompute`) saved tensors come back as new tensor objects, and both
        # the FP8 weight cache and a deferred weight gradient are keyed by the parameter.
        weight = ctx.param
        n, k = weight.shape
        with autocast_off(grad_out):
            g = grad_out.reshape(-1, n)  # [T, N]
            # tiles along N: dgrad's K
            g_q, g_s = act_quant(pad_last(g, round_up(n, BLOCK)), scale_floor=GRAD_SCALE_FLOOR)
            w_t, w_t_scales = quantize_weight(weight, transposed=True)  # [Kp, Np]
            dx = fp8_gemm(g_q, g_s, w_t, w_t_scales, out_dtype=ctx.x_dtype)[:, :k].reshape(ctx.x_shape)
            dw = None
            if x_t is not None:
                # [N, T_pad]: tiles along tokens, quantized now
                g_t, g_t_scales = act_quant_transpose(g, scale_floor=GRAD_SCALE_FLOOR)

                def weight_gradient() -> torch.Tensor:
                    return fp8_gemm(g_t, g_t_scales, x_t, x_t_scales, out_dtype=torch.float32)  # [N, K]

                dw = deferred_or_now(weight, weight_gradient)
            db = g.float().sum(0) if ctx.has_bias else None
        return dx, dw, db, None, None


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, scale_fmt: str | None = None
) -> torch.Tensor:
    """F.linear with FP8 GEMMs in forward and backward (see the module docstring); `scale_fmt`
    ("ue8m0" or None) is the scale format of the input's tiles."""
    return _FP8LinearFunction.apply(x, weight, bias, torch.is_grad_enabled() and weight.requires_grad, scale_fmt)


class FP8Linear(SwappableLinear):
    """Drop-in nn.Linear (same parameters, names and shapes) computing with fp8_linear.

    `input_scale_fmt` ("ue8m0" or None) is set by the precision policy from outside."""

    input_scale_fmt: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, self.input_scale_fmt)
