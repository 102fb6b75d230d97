"""Public FP8 GEMM entry points: check arguments, then run the Triton kernel or its torch twin.

    fp8_gemm(a, a_s, b, b_s, out_dtype=bf16)                      -> a @ b.T          [M, N]
    fp8_grouped_gemm(a, a_s, b, b_s, group_sizes, out_dtype=bf16)   -> per group a_g @ b[g].T  [T, N]
    fp8_wgrad_grouped_gemm(a, a_s, b, b_s, group_sizes, out_dtype=fp32) -> [G, N, C]

Operands are e4m3 and contiguous with K last; K must be a multiple of 128 (pad with zeros). a has
1x128 tile scales [M, K/128]; b has 128x128 block scales [ceil(N/128), K/128] (a weight) or 1x128
tile scales [N, K/128] (an activation or gradient, as in weight-gradient GEMMs). M and N are free.

group_sizes: a host list, or a 1-D int tensor (the router's counts, on the device). The Triton path
keeps a tensor on the device: its values are not checked there (a check would be a host read) but
clamped so they cannot address memory outside the operands; the torch twin reads them back.
"""

from __future__ import annotations

import torch
from moeforge.kernels import gemm_torch
from moeforge.kernels.backend import use_triton
from moeforge.kernels.checks import (
    check_block_multiple,
    check_fp8,
    check_same_device,
    check_scales,
    fail,
    group_sizes_arg,
)
from moeforge.kernels.fp8_format import BLOCK, ceil_div

OUT_DTYPES = (torch.bfloat16, torch.float32, torch.float16)


def _check_out_dtype(op: str, out_dtype: torch.dtype) -> None:
    if out_dtype not in OUT_DTYPES:
        fail(op, "out_dtype", f"must be bfloat16, float32 or float16, got {out_dtype}")


def _check_a(op: str, a: torch.Tensor, a_s: torch.Tensor) -> tuple[int, int]:
    check_fp8(op, "a", a, 2)
    m, k = a.shape
    check_block_multiple(op, "a", k, BLOCK, "K (last dimension)")
    check_scales(op, "a_s", a_s, {"1x128 tiles": (m, k // BLOCK)})
    return m, k


def fp8_gemm(
    a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """a [M, K] @ b [N, K]^T with FP32 accumulation and per-128-K-block scale promotion -> [M, N]."""
    op = "fp8_gemm"
    _check_out_dtype(op, out_dtype)
    m, k = _check_a(op, a, a_s)
    check_fp8(op, "b", b, 2)
    n = b.shape[0]
    if b.shape[1] != k:
        fail(op, "b", f"K mismatch: a is [{m}, {k}] but b is {list(b.shape)} (b is [N, K], used transposed)")
    check_scales(op, "b_s", b_s, {"128x128 blocks": (ceil_div(n, BLOCK), k // BLOCK), "1x128 tiles": (n, k // BLOCK)})
    check_same_device(op, a=a, a_s=a_s, b=b, b_s=b_s)
    if use_triton(a, b):
        from moeforge.kernels.triton_gemm import fp8_gemm_triton

        return fp8_gemm_triton(a, a_s, b, b_s, out_dtype)
    return gemm_torch.fp8_gemm_torch(a, a_s, b, b_s, out_dtype)


def fp8_grouped_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    group_sizes: torch.Tensor | list[int],
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """MoE experts in one launch: rows of a [T, K] are grouped contiguously by expert (group_sizes
    rows each, in order); expert g multiplies its rows by b[g]^T, b [G, N, K] with block scales
    b_s [G, ceil(N/128), K/128] -> [T, N]."""
    op = "fp8_grouped_gemm"
    _check_out_dtype(op, out_dtype)
    t, k = _check_a(op, a, a_s)
    check_fp8(op, "b", b, 3)
    g, n, kb = b.shape
    if kb != k:
        fail(op, "b", f"K mismatch: a is [{t}, {k}] but b is {list(b.shape)} (b is [G, N, K])")
    check_scales(op, "b_s", b_s, {"128x128 blocks": (g, ceil_div(n, BLOCK), k // BLOCK)})
    check_same_device(op, a=a, a_s=a_s, b=b, b_s=b_s)
    triton_path = use_triton(a, b)
    sizes = group_sizes_arg(op, group_sizes, t, groups=g, host=not triton_path)
    if triton_path:
        from moeforge.kernels.triton_gemm import fp8_grouped_gemm_triton

        return fp8_grouped_gemm_triton(a, a_s, b, b_s, sizes, out_dtype)
    return gemm_torch.fp8_grouped_gemm_torch(a, a_s, b, b_s, sizes, out_dtype)


def fp8_wgrad_grouped_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    group_sizes: torch.Tensor | list[int],
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Expert weight gradients in one launch: a [N, T_pad] (output gradients^T) and b [C, T_pad]
    (inputs^T), both from act_quant_transpose(..., group_sizes) with 1x128 scales along tokens.
    out[g] = a_g @ b_g^T over expert g's token segment -> [G, N, C]. The segments start at token 0;
    with a tensor of sizes (act_quant_transpose's capacity layout) columns after them are ignored."""
    op = "fp8_wgrad_grouped_gemm"
    _check_out_dtype(op, out_dtype)
    n, t_pad = _check_a(op, a, a_s)
    check_fp8(op, "b", b, 2)
    c = b.shape[0]
    if b.shape[1] != t_pad:
        fail(op, "b", f"token mismatch: a is [{n}, {t_pad}] but b is {list(b.shape)} (b is [C, T_pad])")
    check_scales(op, "b_s", b_s, {"1x128 tiles": (c, t_pad // BLOCK)})
    check_same_device(op, a=a, a_s=a_s, b=b, b_s=b_s)
    triton_path = use_triton(a, b)
    sizes = group_sizes_arg(op, group_sizes, t_pad, padded_to=BLOCK, host=not triton_path)
    if triton_path:
        from moeforge.kernels.triton_gemm import fp8_wgrad_grouped_gemm_triton

        return fp8_wgrad_grouped_gemm_triton(a, a_s, b, b_s, sizes, out_dtype)
    return gemm_torch.fp8_wgrad_grouped_gemm_torch(a, a_s, b, b_s, sizes, out_dtype)
