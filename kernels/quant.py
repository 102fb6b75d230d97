"""Public FP8 quantization entry points: check arguments, then run the Triton kernel or its torch twin.

    act_quant(x, block_size=128, scale_fmt=None)      -> (x_fp8 [..., K], scales [..., K/128])
    act_quant_transpose(x, block_size=128, group_sizes=None)
                                                      -> (xt_fp8 [C, T_pad], scales [C, T_pad/128])
    weight_quant(w, block_size=128)                   -> (w_fp8 [..., N, K], scales [..., ceil(N/128), K/128])
    weight_dequant(w_fp8, scales, block_size=128, dtype=torch.float32) -> w [..., N, K]

The format is described in fp8_format.py. K (the dimension the tiles run along) must be a multiple
of block_size; N (weight rows) may be anything, its last block being partial. Callers with other K
pad with zeros (fp8_linear.py does this for weights and activations together).
"""

from __future__ import annotations

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
    group_sizes_list,
)
from moeforge.kernels.fp8_format import ceil_div

SCALE_FORMATS = (None, "ue8m0")


def act_quant(
    x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations to e4m3 with one FP32 scale per 1 x block_size tile of the last dim.

    scale = max(amax, 1e-4) / 448 (rounded up to a power of two when scale_fmt="ue8m0")."""
    op = "act_quant"
    check_high_precision(op, "x", x)
    check_block_size(op, block_size)
    if scale_fmt not in SCALE_FORMATS:
        fail(op, "scale_fmt", f"must be None or 'ue8m0', got {scale_fmt!r}")
    check_block_multiple(op, "x", x.shape[-1], block_size, "last dimension")
    if use_triton(x):
        from moeforge.kernels.triton_quant import act_quant_triton

        return act_quant_triton(x, block_size, scale_fmt)
    return quant_torch.act_quant_torch(x, block_size, scale_fmt)


def act_quant_transpose(
    x: torch.Tensor, block_size: int = 128, group_sizes: torch.Tensor | list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused quantize-and-transpose for weight-gradient GEMMs: x [T, C] -> x^T in e4m3 [C, T_pad]
    with 1 x block_size tiles along the tokens, and scales [C, T_pad / block_size].

    T is padded with zero tokens up to a multiple of block_size. With `group_sizes` (tokens per
    expert, summing to T) each group gets its own padded segment, so no tile mixes two experts."""
    op = "act_quant_transpose"
    check_high_precision(op, "x", x)
    check_block_size(op, block_size)
    if x.dim() != 2:
        fail(op, "x", f"expected 2 dimensions [tokens, channels], got shape {list(x.shape)}")
    sizes = _group_sizes_list(op, group_sizes, x.shape[0])
    if use_triton(x):
        from moeforge.kernels.triton_quant import act_quant_transpose_triton

        return act_quant_transpose_triton(x, block_size, sizes)
    return quant_torch.act_quant_transpose_torch(x, block_size, sizes)


def _group_sizes_list(op: str, group_sizes, total: int) -> list[int] | None:
    if group_sizes is None:
        return None
    return group_sizes_list(op, group_sizes, total)


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
