"""Triton FP8 GEMMs with fine-grained scaling (twins in gemm_torch.py; entry points in gemm.py).

All three kernels are "NT": both operands are row-major with K contiguous, the layout the e4m3
tensor-core instructions want on Hopper. The K loop walks 128-wide blocks: each block's product is
accumulated by the tensor cores, then promoted into the FP32 accumulator with its scales applied
(promotion interval N_C = 128, as in DeepSeek-V3), which bounds the error of the tensor cores'
limited-precision internal accumulation to one block.

- `fp8_gemm`: a [M, K] (1x128 scales) @ b [N, K]^T (128x128 block or 1x128 tile scales).
- `fp8_grouped_gemm`: M-grouped, one launch for all experts: rows of a come in contiguous groups,
  group g uses b[g]. Tiles never straddle groups; the tile -> group map is computed in the kernel
  from the group sizes (no host-side table, no sync).
- `fp8_wgrad_grouped_gemm`: K-grouped weight gradients: for each group, a_g @ b_g^T over that
  group's own 128-aligned token segment (from act_quant_transpose with group_sizes).

FLOPs 2*M*N*K; bytes M*K + N*K (e4m3) + M*N*2 (bf16 out) + scales.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from moeforge.kernels.fp8_format import BLOCK, ceil_div
from moeforge.kernels.triton_launch import launcher
from moeforge.kernels.triton_quant import _group_of_tile, _to_output


@triton.jit
def _scaled_mma(
    a_ptr, a_s_ptr, b_ptr, b_s_ptr, rows_a, rows_b, scale_rows_b, K, kb_start, kb_count,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """FP32 [BLOCK_M, BLOCK_N] = sum over K blocks kb_start.. of a_s*b_s * (a_kb @ b_kb^T).

    rows_a / rows_b: int64 row indices (already clamped in range) into a [*, K] and b [*, K];
    scale_rows_b: the rows of b's scale matrix [*, K/BLOCK_K] that hold each column's scale."""
    kb_total = K // BLOCK_K
    offs_k = kb_start * BLOCK_K + tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows_a[:, None] * K + offs_k[None, :]
    b_ptrs = b_ptr + rows_b[None, :] * K + offs_k[:, None]
    a_s_ptrs = a_s_ptr + rows_a * kb_total + kb_start
    b_s_ptrs = b_s_ptr + scale_rows_b * kb_total + kb_start
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(kb_count):
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
        a_s = tl.load(a_s_ptrs)
        b_s = tl.load(b_s_ptrs)
        acc += tl.dot(a, b) * (a_s[:, None] * b_s[None, :])
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
        a_s_ptrs += 1
        b_s_ptrs += 1
    return acc


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, a_s_ptr, b_ptr, b_s_ptr, c_ptr, M, N, K,
    B_ROW_SCALES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Programs walk GROUP_M row tiles per column tile so neighbouring programs share b in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows/cols re-read a valid row (no load masks, so loads pipeline); never stored.
    rows_a = (rows % M).to(tl.int64)
    rows_b = (cols % N).to(tl.int64)
    scale_rows_b = rows_b if B_ROW_SCALES else rows_b // BLOCK_K
    acc = _scaled_mma(
        a_ptr, a_s_ptr, b_ptr, b_s_ptr, rows_a, rows_b, scale_rows_b, K, 0, K // BLOCK_K, BLOCK_M, BLOCK_N, BLOCK_K
    )
    c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(c_ptrs, _to_output(acc, c_ptr), mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _fp8_grouped_gemm_kernel(
    a_ptr, a_s_ptr, b_ptr, b_s_ptr, c_ptr, sizes_ptr, G, N, K,
    G_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    group, first_tile, row_start, n_rows, total = _group_of_tile(sizes_ptr, G, tile, BLOCK_M, G_POW2)
    if tile < total:  # the grid is an upper bound on the number of tiles
        local = (tile - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = local < n_rows
        rows_a = (row_start + tl.where(row_ok, local, 0)).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_b = (cols % N).to(tl.int64)
        kb_total = K // BLOCK_K
        b_base = b_ptr + group.to(tl.int64) * N * K
        b_s_base = b_s_ptr + group.to(tl.int64) * tl.cdiv(N, BLOCK_K) * kb_total
        acc = _scaled_mma(
            a_ptr, a_s_ptr, b_base, b_s_base, rows_a, rows_b, rows_b // BLOCK_K, K, 0, kb_total,
            BLOCK_M, BLOCK_N, BLOCK_K,
        )
        c_ptrs = c_ptr + rows_a[:, None] * N + cols[None, :]
        tl.store(c_ptrs, _to_output(acc, c_ptr), mask=row_ok[:, None] & (cols[None, :] < N))


@triton.jit
def _fp8_wgrad_grouped_kernel(
    a_ptr, a_s_ptr, b_ptr, b_s_ptr, c_ptr, sizes_ptr, G, N, C, T_PAD,
    G_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = tl.program_id(2)
    g_ids = tl.arange(0, G_POW2)
    sizes = tl.load(sizes_ptr + g_ids, mask=g_ids < G, other=0).to(tl.int32)
    blocks = (sizes + BLOCK_K - 1) // BLOCK_K  # each group's token segment, in 128-blocks
    kb_start = tl.sum(tl.where(g_ids < group, blocks, 0), 0)
    kb_count = tl.sum(tl.where(g_ids == group, blocks, 0), 0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_a = (rows % N).to(tl.int64)
    rows_b = (cols % C).to(tl.int64)
    acc = _scaled_mma(
        a_ptr, a_s_ptr, b_ptr, b_s_ptr, rows_a, rows_b, rows_b, T_PAD, kb_start, kb_count, BLOCK_M, BLOCK_N, BLOCK_K
    )
    c_ptrs = c_ptr + group.to(tl.int64) * N * C + rows.to(tl.int64)[:, None] * C + cols[None, :]
    tl.store(c_ptrs, _to_output(acc, c_ptr), mask=(rows[:, None] < N) & (cols[None, :] < C))


# ---- launch configurations ------------------------------------------------------------------------
# Interpreted (CPU tests): small tiles so that several tiles, partial tiles and BLOCK_N < 128 (two
# tiles per scale block) are exercised at tiny sizes. GPU: autotuned over a few Hopper-sized tiles.
_INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64}
# Two FP32 accumulators per tile (the running sum and the block being promoted): 128 x 256 tiles
# spill on 8 warps (see sass_report.py), so the tiles stay at 128 x 128 per 8 warps or smaller.
GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 256}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_stages=4, num_warps=4),
]


_gemm, _gemm_kw = launcher(_fp8_gemm_kernel, GPU_CONFIGS, ["M", "N", "K", "B_ROW_SCALES"], _INTERPRET_CONFIG)
_grouped, _grouped_kw = launcher(_fp8_grouped_gemm_kernel, GPU_CONFIGS, ["N", "K"], _INTERPRET_CONFIG)
_wgrad, _wgrad_kw = launcher(_fp8_wgrad_grouped_kernel, GPU_CONFIGS, ["N", "C"], _INTERPRET_CONFIG)


def _g_pow2(groups: int) -> int:
    return triton.next_power_of_2(max(groups, 2))


def fp8_gemm_triton(
    a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Triton twin of fp8_gemm_torch."""
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m and n:
        row_scales = b_s.shape[0] == n and n != ceil_div(n, BLOCK)

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        _gemm[grid](a, a_s, b, b_s, c, m, n, k, B_ROW_SCALES=row_scales, BLOCK_K=BLOCK, GROUP_M=8, **_gemm_kw)
    return c


def fp8_grouped_gemm_triton(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    group_sizes: list[int],
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Triton twin of fp8_grouped_gemm_torch (one launch for all groups)."""
    t, k = a.shape
    g, n, _ = b.shape
    c = torch.empty(t, n, dtype=out_dtype, device=a.device)
    if t and n:
        sizes = torch.tensor(group_sizes, dtype=torch.int32, device=a.device)

        def grid(meta):
            # sum_g ceil(n_g / BM) <= ceil(T / BM) + G: surplus programs exit at once.
            return (triton.cdiv(t, meta["BLOCK_M"]) + g, triton.cdiv(n, meta["BLOCK_N"]))

        _grouped[grid](a, a_s, b, b_s, c, sizes, g, n, k, G_POW2=_g_pow2(g), BLOCK_K=BLOCK, **_grouped_kw)
    return c


def fp8_wgrad_grouped_gemm_triton(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    group_sizes: list[int],
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Triton twin of fp8_wgrad_grouped_gemm_torch (one launch for all groups)."""
    n, t_pad = a.shape
    c_dim = b.shape[0]
    g = len(group_sizes)
    out = torch.empty(g, n, c_dim, dtype=out_dtype, device=a.device)
    if g and n and c_dim:
        sizes = torch.tensor(group_sizes, dtype=torch.int32, device=a.device)

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(c_dim, meta["BLOCK_N"]), g)

        _wgrad[grid](a, a_s, b, b_s, out, sizes, g, n, c_dim, t_pad, G_POW2=_g_pow2(g), BLOCK_K=BLOCK, **_wgrad_kw)
    return out
