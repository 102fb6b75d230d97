"""Public FP8 quantization entry points: check arguments, then run the Triton kernel or its torch twin.

    act_quant(x, block_size=128, scale_fmt=None, *, scale_floor=SCALE_FLOOR)
                                                      -> (x_fp8 [..., K], scales [..., K/128])
    act_quant_transpose(x, block_size=128, group_sizes=None, scale_fmt=None, *, scale_floor=SCALE_FLOOR,
                        capacity=None)                -> (xt_fp8 [C, T_pad], scales [C, T_pad/128])
    weight_quant(w, block_size=128)                   -> (w_fp8 [..., N, K], scales [..., ceil(N/128), K/128])
    weight_dequant(w_fp8, scales, block_size=128, dtype=torch.float32) -> w [..., N, K]

The format is described in `fp8_format`. K (the dimension the tiles run along) must be a multiple
of block_size; N (weight rows) may be anything, its last block being partial. Callers with other K
pad with zeros (`fp8_linear.FP8Linear` does this for weights and activations together).

`scale_floor` is the amax floor of the activation quantizers: SCALE_FLOOR (DeepSeek's 1e-4) for
activations, GRAD_SCALE_FLOOR for gradients, whose tiles are far smaller (`fp8_format` explains
both). Weights always use SCALE_FLOOR.
"""

from __future__ import annotations

import math
import numbers
import struct

import torch
from moeforge.kernels import quant_torch
from moeforge.kernels.backend import use_triton
from moeforge.kernels.checks import (
    check_block_multiple,
    check_block_size,
    check_fp8,
    check_high_precision,
    check_scales,
    fail,
    group_sizes_arg,
)
from moeforge.kernels.fp8_format import GRAD_SCALE_FLOOR, SCALE_FLOOR, ceil_div, token_capacity

SCALE_FORMATS = (None, "ue8m0")
_FP32_MAX = torch.finfo(torch.float32).max


def act_quant(
    x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None, *, scale_floor: float = SCALE_FLOOR
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations to e4m3 with one FP32 scale per 1 x block_size tile of the last dim.

    scale = max(amax, scale_floor) / 448 (rounded up to a power of two when scale_fmt="ue8m0");
    scale_floor: SCALE_FLOOR (1e-4) for activations, GRAD_SCALE_FLOOR for gradients."""
    op = "act_quant"
    check_high_precision(op, "x", x)
    check_block_size(op, block_size)
    _check_scale_fmt(op, scale_fmt)
    floor = _scale_floor_fp32(op, scale_floor)
    check_block_multiple(op, "x", x.shape[-1], block_size, "last dimension")
    if use_triton(x):
        from moeforge.kernels.triton_quant import act_quant_triton

        return act_quant_triton(x, block_size, scale_fmt, scale_floor=floor)
    return quant_torch.act_quant_torch(x, block_size, scale_fmt, scale_floor=floor)


def act_quant_transpose(
    x: torch.Tensor,
    block_size: int = 128,
    group_sizes: torch.Tensor | list[int] | None = None,
    scale_fmt: str | None = None,
    *,
    scale_floor: float = SCALE_FLOOR,
    capacity: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused quantize-and-transpose for weight-gradient GEMMs: x [T, C] -> x^T in e4m3 [C, T_pad]
    with 1 x block_size tiles along the tokens, and scales [C, T_pad / block_size].

    T is padded with zero tokens up to a multiple of block_size. With `group_sizes` (tokens per
    expert, summing to T) each group gets its own padded segment, so no tile mixes two experts.
    `scale_fmt` and `scale_floor` are act_quant's (the scale of each token tile).

    `capacity` (a multiple of block_size, >= fp8_format.token_capacity(T, groups)): the output has
    exactly that many token columns, the groups' segments first and zero tokens after them, so its
    shape does not depend on the group sizes. That is what lets the Triton path take the sizes as a
    device tensor without reading them back; without a capacity the exact width is a host value."""
    op = "act_quant_transpose"
    check_high_precision(op, "x", x)
    check_block_size(op, block_size)
    _check_scale_fmt(op, scale_fmt)
    floor = _scale_floor_fp32(op, scale_floor)
    if x.dim() != 2:
        fail(op, "x", f"expected 2 dimensions [tokens, channels], got shape {list(x.shape)}")
    triton_path = use_triton(x)
    sizes = None
    if group_sizes is not None:
        sizes = group_sizes_arg(op, group_sizes, x.shape[0], host=not triton_path or capacity is None)
    if capacity is not None:
        groups = 1 if sizes is None else len(sizes)
        least = token_capacity(x.shape[0], groups, block_size)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity % block_size or capacity < least:
            fail(op, "capacity", f"must be a multiple of {block_size} and >= {least} "
                 f"(token_capacity of {x.shape[0]} rows in {groups} groups), got {capacity!r}")
    if triton_path:
        from moeforge.kernels.triton_quant import act_quant_transpose_triton

        return act_quant_transpose_triton(x, block_size, sizes, scale_fmt, scale_floor=floor, capacity=capacity)
    return quant_torch.act_quant_transpose_torch(x, block_size, sizes, scale_fmt, scale_floor=floor, capacity=capacity)


def _check_scale_fmt(op: str, scale_fmt) -> None:
    if scale_fmt not in SCALE_FORMATS:
        fail(op, "scale_fmt", f"must be None or 'ue8m0', got {scale_fmt!r}")


def _scale_floor_fp32(op: str, scale_floor) -> float:
    """The floor as the FP32 number both backends compare amax with. It must keep every scale a
    normal FP32 number: GRAD_SCALE_FLOOR <= floor (after rounding to FP32) <= the FP32 maximum."""
    if isinstance(scale_floor, bool) or not isinstance(scale_floor, numbers.Real):
        fail(op, "scale_floor", f"expected a number, got {type(scale_floor).__name__}")
    floor = float(scale_floor)
    if not (math.isfinite(floor) and floor <= _FP32_MAX):
        fail(op, "scale_floor", f"must be a finite FP32 number, got {scale_floor!r}")
    # Both backends see this exact value: rounded to FP32 as torch rounds (to nearest even), in
    # Python (a host tensor's .item() would do, but this needs no tensor at all).
    floor = struct.unpack("f", struct.pack("f", floor))[0]
    if floor < GRAD_SCALE_FLOOR:
        fail(
            op,
            "scale_floor",
            f"must be >= GRAD_SCALE_FLOOR ({GRAD_SCALE_FLOOR:.6g}, so that floor / 448 is a normal FP32 "
            f"number), got {scale_floor!r}",
        )
    return floor


def weight_quant(w: torch.Tensor, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize weights [..., N, K] to e4m3 with one FP32 scale per block_size x block_size block."""
    op = "weight_quant"
    check_high_precision(op, "w", w, min_dim=2)
    check_block_size(op, block_size)
    check_block_multiple(op, "w", w.shape[-1], block_size, "last dimension (K)")
    if use_triton(w):
        from moeforge.kernels.triton_quant import weight_quant_triton

        return weight_quant_triton(w, block_size)
    return quant_torch.weight_quant_torch(w, block_size)


def weight_dequant(
    w_fp8: torch.Tensor, scales: torch.Tensor, block_size: int = 128, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of weight_quant: e4m3 [..., N, K] and block scales -> dtype [..., N, K]."""
    op = "weight_dequant"
    check_block_size(op, block_size)
    if not isinstance(w_fp8, torch.Tensor) or w_fp8.dim() < 2:
        fail(op, "w_fp8", "expected an e4m3 tensor with at least 2 dimensions [..., N, K]")
    check_fp8(op, "w_fp8", w_fp8, w_fp8.dim())
    *lead, n, k = w_fp8.shape
    check_block_multiple(op, "w_fp8", k, block_size, "last dimension (K)")
    check_scales(op, "scales", scales, {"block": (*lead, ceil_div(n, block_size), k // block_size)})
    if use_triton(w_fp8, scales):
        from moeforge.kernels.triton_quant import weight_dequant_triton

        return weight_dequant_triton(w_fp8, scales, block_size, dtype)
    return quant_torch.weight_dequant_torch(w_fp8, scales, block_size, dtype)
