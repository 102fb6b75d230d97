"""Pure-torch twins of the FP8 GEMMs in `triton_gemm` (same signatures and semantics).

Semantics: out = sum over 128-wide K blocks kb of (a_s[:, kb] b_s[:, kb]^T) * (a_kb @ b_kb^T), FP32
accumulation. The twin dequantizes each operand (e4m3 * its tile scale, in FP32) and multiplies in
FP32, which is the same sum in another order: the two agree to FP32 rounding. Arguments are assumed
checked (`gemm.fp8_gemm` and the grouped entry points beside it). b's scales are either 128x128 blocks
[ceil(N/128), K/128] or 1x128 tiles [N, K/128].
"""

from __future__ import annotations

import torch
from moeforge.kernels.fp8_format import BLOCK, round_up
from moeforge.kernels.quant_torch import expand_block_scales


def dequant_rows(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """e4m3 [R, K] with per-row tile scales [R, K/128] -> FP32 [R, K]."""
    r, k = q.shape
    return (q.float().view(r, k // BLOCK, BLOCK) * scales.unsqueeze(-1)).view(r, k)


def _row_scales(b: torch.Tensor, b_s: torch.Tensor) -> torch.Tensor:
    return b_s if b_s.shape[0] == b.shape[0] else expand_block_scales(b_s, b.shape[0])


def fp8_gemm_torch(
    a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """a [M, K] e4m3 (1x128 scales) @ b [N, K]^T e4m3 (128x128 or 1x128 scales) -> [M, N] out_dtype."""
    out = dequant_rows(a, a_s) @ dequant_rows(b, _row_scales(b, b_s)).t()
    return out.to(out_dtype)


def fp8_grouped_gemm_torch(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    group_sizes: list[int],
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """M-grouped: rows of a [T, K] come in contiguous groups (group_sizes, in order); group g is
    multiplied by its own b[g] [N, K]^T (scales b_s[g]) -> [T, N]."""
    out = torch.empty(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    start = 0
    for g, rows in enumerate(group_sizes):
        if rows:
            sl = slice(start, start + rows)
            out[sl] = fp8_gemm_torch(a[sl], a_s[sl], b[g], b_s[g], out_dtype)
        start += rows
    return out


def fp8_wgrad_grouped_gemm_torch(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    group_sizes: list[int],
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """K-grouped (weight gradients of grouped experts): a [N, T_pad] and b [C, T_pad] hold tokens
    along K, each group's tokens in its own 128-aligned segment (act_quant_transpose with
    group_sizes); both have 1x128 scales. out[g] = a_g @ b_g^T over group g's segment -> [G, N, C]."""
    out = torch.zeros(len(group_sizes), a.shape[0], b.shape[0], dtype=out_dtype, device=a.device)
    start = 0
    for g, rows in enumerate(group_sizes):
        width = round_up(rows, BLOCK)
        if width:
            cols, blocks = slice(start, start + width), slice(start // BLOCK, (start + width) // BLOCK)
            out[g] = fp8_gemm_torch(
                a[:, cols].contiguous(), a_s[:, blocks].contiguous(), b[:, cols].contiguous(),
                b_s[:, blocks].contiguous(), out_dtype,
            )
        start += width
    return out
