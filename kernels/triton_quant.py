"""Triton quantization kernels (twins in `quant_torch`; public entry points in `quant`).

Memory traffic (the floor these kernels are measured against in the benchmark), per element:
act_quant reads 2 bytes (bf16) and writes 1 byte + 4/128 bytes of scale; weight_quant reads 4 (fp32
master) and writes 1; the transpose variant moves the same bytes with a transposed store.

The amax floor (`fp8_format.SCALE_FLOOR` or `fp8_format.GRAD_SCALE_FLOOR`) of the activation quantizers is a
runtime fp32 argument, `floor`: one compiled kernel serves both, and the wrappers pass the exact FP32
value their torch twins clamp with, so the scales stay bit-identical. weight_quant keeps SCALE_FLOOR.

e4m3 rounding: values are first snapped to the e4m3 grid in FP32 arithmetic (`_snap_e4m3`, round to
nearest even, subnormals included) and only then converted. The conversion of an on-grid value is
exact on every backend. This matters because Triton's CPU interpreter rounds FP32->FP8 half-up and
drops the mantissa carry (127.4 became 64), which would make interpreted tests meaningless; on a GPU
the snap costs a few integer instructions in a memory-bound kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from moeforge.kernels.fp8_format import FP8_MAX, SCALE_FLOOR, ceil_div, round_up
from moeforge.kernels.group_tables import GroupSizes, group_counts
from moeforge.kernels.triton_launch import TritonKernel

# Compiled kernels may only read module globals that are tl.constexpr (the interpreter is laxer).
_FP8_MAX = tl.constexpr(FP8_MAX)
_SCALE_FLOOR = tl.constexpr(SCALE_FLOOR)  # weight_quant's floor; the activation kernels take `floor`


@triton.jit
def _snap_e4m3(v):
    """Round FP32 v (|v| <= 448) to the nearest e4m3 value (ties to even), staying in FP32."""
    bits = v.to(tl.int32, bitcast=True)
    biased_exp = (bits >> 23) & 0xFF
    # e4m3 keeps 3 mantissa bits: the grid step is 2^(e-3); below 2^-6 (subnormals) it is 2^-9.
    step_exp = tl.maximum(biased_exp, 127 - 6) - 3
    step = (step_exp << 23).to(tl.float32, bitcast=True)
    inv_step = ((254 - step_exp) << 23).to(tl.float32, bitcast=True)
    y = tl.abs(v) * inv_step  # exact (power of two); y <= 16
    # Adding and removing 1.5 * 2^23 rounds y < 2^22 to an integer, ties to even (FP32 add).
    y = (y + 12582912.0) - 12582912.0
    snapped = (y * step).to(tl.int32, bitcast=True)
    # Put the sign bit back, so values that round to zero keep it (-0.0 -> 0x80, as torch gives).
    return (snapped | ((bits >> 31) << 31)).to(tl.float32, bitcast=True)


@triton.jit
def _tile_scale(amax, floor, UE8M0: tl.constexpr):
    scale = tl.math.div_rn(tl.maximum(amax, floor), _FP8_MAX)
    if UE8M0:
        bits = scale.to(tl.int32, bitcast=True)
        biased_exp = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        scale = (biased_exp << 23).to(tl.float32, bitcast=True)
    return scale


@triton.jit
def _quantize(x, scale):
    """x / scale (IEEE division, as torch does) clamped to the finite e4m3 range and snapped."""
    y = tl.math.div_rn(x, scale)
    y = tl.minimum(tl.maximum(y, -_FP8_MAX), _FP8_MAX)
    return _snap_e4m3(y).to(tl.float8e4nv)


@triton.jit
def _to_output(acc, c_ptr):
    """Cast the FP32 accumulator to c's dtype, rounding to nearest even. For bf16 the rounding is
    done on the bits first: Triton's CPU interpreter truncates FP32->BF16, the GPU rounds; this way
    both give the bytes torch gives."""
    if c_ptr.dtype.element_ty == tl.bfloat16:
        bits = acc.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        acc = bits.to(tl.float32, bitcast=True)
    return acc.to(c_ptr.dtype.element_ty)


@triton.jit(do_not_specialize=["M"])
def _act_quant_kernel(
    x_ptr, q_ptr, s_ptr, M, K, floor, UE8M0: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr
):
    # One program: ROWS rows x one BLOCK-wide tile; one scale per row. floor: fp32 amax floor.
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * ROWS + tl.arange(0, ROWS)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < M
    offsets = rows.to(tl.int64)[:, None] * K + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=row_ok[:, None], other=0.0).to(tl.float32)
    scale = _tile_scale(tl.max(tl.abs(x), axis=1), floor, UE8M0)  # [ROWS]
    tl.store(q_ptr + offsets, _quantize(x, scale[:, None]), mask=row_ok[:, None])
    tl.store(s_ptr + rows.to(tl.int64) * (K // BLOCK) + pid_k, scale, mask=row_ok)


ACT_QUANT_CONFIGS = [triton.Config({"ROWS": rows}, num_warps=warps) for rows in (16, 32, 64) for warps in (4, 8)]
# Keyed on the row width only: the row count is data (rows routed to an expert).
_act_quant = TritonKernel("act_quant", _act_quant_kernel, ("K",), configs=lambda: ACT_QUANT_CONFIGS,
                          interpret_meta={"ROWS": 16})


def act_quant_triton(
    x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None, *, scale_floor: float = SCALE_FLOOR
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of act_quant_torch: x [..., K] -> (e4m3 [..., K], fp32 scales [..., K/B])."""
    x = x.contiguous()
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(*x.shape[:-1], k // block_size, dtype=torch.float32, device=x.device)
    if m:

        def grid(meta):
            return (triton.cdiv(m, meta["ROWS"]), k // block_size)

        _act_quant(grid, x, q, s, m, k, float(scale_floor), UE8M0=scale_fmt == "ue8m0", BLOCK=block_size)
    return q, s


@triton.jit
def _group_of_tile(sizes_ptr, G, tile, TILE: tl.constexpr, G_POW2: tl.constexpr):
    """Which group owns the `tile`-th TILE-row tile when every group's rows are cut into their own
    tiles (group g has ceil(n_g / TILE) of them), in group order. Returns (group, first tile of the
    group, first row of the group, row count of the group, total tiles); a tile past the last
    group's gets row count 0. Vector ops over <= G_POW2 groups: no tile table to build."""
    g_ids = tl.arange(0, G_POW2)
    sizes = tl.load(sizes_ptr + g_ids, mask=g_ids < G, other=0).to(tl.int32)
    tiles = (sizes + TILE - 1) // TILE
    tile_end = tl.cumsum(tiles, 0)  # inclusive
    total = tl.sum(tiles, 0)
    group = tl.sum((tile_end <= tile).to(tl.int32), 0)
    is_group = g_ids == group
    first_tile = tl.sum(tl.where(is_group, tile_end - tiles, 0), 0)
    row_start = tl.sum(tl.where(g_ids < group, sizes, 0), 0)
    rows = tl.sum(tl.where(is_group, sizes, 0), 0)
    return group, first_tile, row_start, rows, total


@triton.jit(do_not_specialize=["TILES"])
def _act_quant_t_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    sizes_ptr,
    G,
    C,
    TILES,
    floor,
    UE8M0: tl.constexpr,
    G_POW2: tl.constexpr,
    BLOCK: tl.constexpr,
    COLS: tl.constexpr,
):
    # One program: one BLOCK-token tile of one group x COLS channels; writes q^T [C, TILES * BLOCK].
    # floor: fp32 amax floor; UE8M0: power-of-two scales, as in _act_quant_kernel. Tiles past the
    # groups' own (a capacity layout, act_quant_transpose(capacity=...)) hold zero tokens.
    tile = tl.program_id(0)
    pid_c = tl.program_id(1)
    t_pad = TILES * BLOCK  # a known multiple of BLOCK: the row pitch of q
    # A tile past every group's tiles belongs to no group: n_rows is 0 there, all its tokens zero.
    _, first_tile, row_start, n_rows, _ = _group_of_tile(sizes_ptr, G, tile, BLOCK, G_POW2)
    local = (tile - first_tile) * BLOCK + tl.arange(0, BLOCK)  # token index inside the group
    tok_ok = local < n_rows
    src_rows = (row_start + local).to(tl.int64)
    cols = pid_c * COLS + tl.arange(0, COLS)
    col_ok = cols < C
    x = tl.load(
        x_ptr + src_rows[:, None] * C + cols[None, :], mask=tok_ok[:, None] & col_ok[None, :], other=0.0
    ).to(tl.float32)  # [BLOCK tokens, COLS channels]; padding tokens read as 0
    scale = _tile_scale(tl.max(tl.abs(x), axis=0), floor, UE8M0)  # [COLS]: one per channel
    q = _quantize(x, scale[None, :])
    out_cols = tile * BLOCK + tl.arange(0, BLOCK)  # padded token position
    tl.store(q_ptr + cols.to(tl.int64)[None, :] * t_pad + out_cols[:, None], q, mask=col_ok[None, :])
    tl.store(s_ptr + cols.to(tl.int64) * TILES + tile, scale, mask=col_ok)


ACT_QUANT_T_CONFIGS = [triton.Config({"COLS": cols}, num_warps=warps) for cols in (32, 64, 128) for warps in (4, 8)]
# Keyed on the channels only: the padded token count is data (tokens routed to each expert).
_act_quant_t = TritonKernel("act_quant_transpose", _act_quant_t_kernel, ("C",), configs=lambda: ACT_QUANT_T_CONFIGS,
                            interpret_meta={"COLS": 64})


def act_quant_transpose_triton(
    x: torch.Tensor,
    block_size: int = 128,
    group_sizes: GroupSizes | None = None,
    scale_fmt: str | None = None,
    *,
    scale_floor: float = SCALE_FLOOR,
    capacity: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of act_quant_transpose_torch: x [T, C] -> (e4m3 [C, T_pad], scales [C, T_pad/B]),
    T_pad = `capacity` when given. Group sizes in a device tensor need a capacity (the exact width
    would be a host read); they are clamped to T rows (`group_tables.group_counts`)."""
    x = x.contiguous()
    t, c = x.shape
    if group_sizes is None:
        group_sizes = [t]
    if capacity is None:
        # The exact width is the output's shape: a host value. Reached with a tensor only from
        # callers that chose the exact layout (the twin semantics of the public entry point).
        host_sizes = group_sizes if isinstance(group_sizes, list) else group_sizes.tolist()
        capacity = sum(round_up(n, block_size) for n in host_sizes)
    q = torch.empty(c, capacity, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(c, capacity // block_size, dtype=torch.float32, device=x.device)
    if capacity and c:
        sizes = group_counts(group_sizes, t, x.device)  # int32 [G], no host read
        g_pow2 = triton.next_power_of_2(max(sizes.shape[0], 2))

        def grid(meta):
            return (capacity // block_size, triton.cdiv(c, meta["COLS"]))

        _act_quant_t(
            grid, x, q, s, sizes, sizes.shape[0], c, capacity // block_size, float(scale_floor),
            UE8M0=scale_fmt == "ue8m0", G_POW2=g_pow2, BLOCK=block_size,
        )
    return q, s


@triton.jit
def _weight_block(N, K, BLOCK: tl.constexpr):
    """This program's BLOCK x BLOCK block of a [G, N, K] stack (grid: G, row blocks, col blocks):
    element offsets, the row mask (the last row block may be partial) and its scale's offset."""
    pid_g = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    offsets = pid_g * N * K + rows.to(tl.int64)[:, None] * K + cols[None, :]
    kb = K // BLOCK
    scale_offset = pid_g * tl.cdiv(N, BLOCK) * kb + pid_n * kb + pid_k
    return offsets, (rows < N)[:, None], scale_offset


@triton.jit
def _weight_quant_kernel(w_ptr, q_ptr, s_ptr, N, K, BLOCK: tl.constexpr):
    offsets, row_ok, scale_offset = _weight_block(N, K, BLOCK)
    w = tl.load(w_ptr + offsets, mask=row_ok, other=0.0).to(tl.float32)
    scale = _tile_scale(tl.max(tl.max(tl.abs(w), axis=1), axis=0), _SCALE_FLOOR, False)
    tl.store(q_ptr + offsets, _quantize(w, scale), mask=row_ok)
    tl.store(s_ptr + scale_offset, scale)


_weight_quant = TritonKernel("weight_quant", _weight_quant_kernel, ("N", "K"))  # Triton's default launch


def weight_quant_triton(w: torch.Tensor, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of weight_quant_torch: w [..., N, K] -> (e4m3, scales [..., ceil(N/B), K/B])."""
    w = w.contiguous()
    *lead, n, k = w.shape
    g = w.numel() // (n * k) if n * k else 0
    nb, kb = ceil_div(n, block_size), k // block_size
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=w.device)
    s = torch.empty(*lead, nb, kb, dtype=torch.float32, device=w.device)
    if g and nb and kb:
        _weight_quant((g, nb, kb), w, q, s, n, k, BLOCK=block_size)
    return q, s


@triton.jit
def _weight_dequant_kernel(q_ptr, s_ptr, out_ptr, N, K, BLOCK: tl.constexpr):
    offsets, row_ok, scale_offset = _weight_block(N, K, BLOCK)
    scale = tl.load(s_ptr + scale_offset)
    q = tl.load(q_ptr + offsets, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, _to_output(q * scale, out_ptr), mask=row_ok)


_weight_dequant = TritonKernel("weight_dequant", _weight_dequant_kernel, ("N", "K"))


def weight_dequant_triton(
    w_fp8: torch.Tensor, scales: torch.Tensor, block_size: int = 128, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Triton twin of weight_dequant_torch."""
    n, k = w_fp8.shape[-2:]
    g = w_fp8.numel() // (n * k) if n * k else 0
    out = torch.empty(w_fp8.shape, dtype=dtype, device=w_fp8.device)
    if g:
        _weight_dequant((g, ceil_div(n, block_size), k // block_size), w_fp8, scales, out, n, k, BLOCK=block_size)
    return out
