"""Triton FP8 GEMMs with fine-grained scaling (twins in `gemm_torch`; entry points in `gemm.fp8_gemm`,
`gemm.fp8_grouped_gemm` and `gemm.fp8_wgrad_grouped_gemm`).

All three kernels are "NT": both operands are row-major with K contiguous, the layout the e4m3
tensor-core instructions want on Hopper. The K loop walks 128-wide blocks: each block's product is
accumulated by the tensor cores, then promoted into the FP32 accumulator with its scales applied
(promotion interval N_C = 128, as in DeepSeek-V3), which bounds the error of the tensor cores'
limited-precision internal accumulation to one block (`tolerance.gemm_tolerance` models it).

- `fp8_gemm`: a [M, K] (1x128 scales) @ b [N, K]^T (128x128 block or 1x128 tile scales).
- `fp8_grouped_gemm`: M-grouped, one launch for all experts: rows of a come in contiguous groups,
  group g uses b[g]. Tiles never straddle groups; the kernel finds a tile's group by a binary
  search in a small prefix table built on the device from the group sizes
  (`group_tables.grouped_gemm_table`: no host read of device counts, no pageable copy), and the grid is
  sized from an upper bound on the tiles that needs only the row and group counts.
- `fp8_wgrad_grouped_gemm`: K-grouped weight gradients: for each group, a_g @ b_g^T over that
  group's own 128-aligned token segment (from act_quant_transpose with group_sizes; token columns
  past the last segment, as in its capacity layout, are not read).

How the kernels are built for Hopper (sm_90), and what moeforge.platform.bench.sass_report checks
they emit:
- Operands through tensor descriptors made in the kernel (`tl.make_tensor_descriptor`): on sm_90
  every A/B tile is one TMA bulk copy (SASS UTMALDG, PTX cp.async.bulk.tensor) completing on an
  mbarrier (SYNCS), out-of-range rows and columns zero-filled by the copy engine. fp8_gemm also
  stores C through a descriptor (UTMASTG) where N's row pitch is 16-byte aligned. Device-side
  descriptors need a small global scratch per program (triton_launch.ensure_allocator).
- Persistent: the grid is min(SMs not reserved for communication (`settings.reserved_sms`), tiles) (or
  `num_programs`) and each program walks tiles program_id, program_id + grid, ... in GROUP_M
  swizzle order, so the tiles in flight at any moment share their A rows and B columns in L2.
- Warp specialization (configs with WARP_SPECIALIZE): Triton's Hopper pass splits the tile loop
  into a producer warp group issuing the TMA copies (registers released with setmaxnreg.dec) and
  two consumer warp groups, one per 64-row half of the 128-row tile (setmaxnreg.inc), each running
  its wgmma chain and then its FP32 promotion. The promotion needs the block's product, so each
  consumer waits for its own wgmma (wait_group 0) before promoting: the overlap comes from the two
  consumers sharing one tensor core (one promotes while the other's wgmma runs) and from the
  producer running num_stages blocks ahead, also across tile boundaries, not from a deeper async
  wgmma queue (Triton keeps none for a product that is consumed in the same iteration).
  Triton applies it on Hopper only with num_warps=4 (so 12 warps in all). These configs have not
  run on a GPU yet: autotuning leaves them out unless MOEFORGE_WARP_SPECIALIZE=1
  (`settings.warp_specialize_autotuning`).
- Launches go through triton_launch.TritonKernel: autotuned on sizes the model fixes (N, K and
  fp8_gemm's row_bucket(M)), never on the routed row counts, which are do_not_specialize arguments.
- The scales stay ordinary loads, issued before the block's wgmma: a_s is [M, K/128] (one 4-byte
  value per row and block, and a TMA box needs 16 contiguous bytes) and the 128x128 block scale of
  b is one scalar per tile and block. Together they are 1/32 of A's bytes and hit in L1/L2.

Under TRITON_INTERPRET=1 the same source runs (the interpreter implements tensor descriptors and
ignores warp_specialize): it checks indexing, tile order and the persistent loop; its tl.dot is
exact FP32, so it does not check tensor-core numerics.

FLOPs 2*M*N*K; bytes M*K + N*K (e4m3) + M*N*2 (bf16 out) + scales.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from moeforge.kernels.fp8_format import BLOCK, ceil_div
from moeforge.kernels.group_tables import GroupSizes, grouped_gemm_table, segment_block_prefix
from moeforge.kernels.settings import persistent_programs, warp_specialize_autotuning
from moeforge.kernels.triton_launch import TritonKernel, row_bucket
from moeforge.kernels.triton_quant import _to_output


@triton.jit
def _swizzle(t, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of the t-th tile of a num_m x num_n grid: bands of GROUP_M row tiles, each
    band walked column by column with its row tiles fastest, then the next band."""
    per_band = GROUP_M * num_n
    first_m = (t // per_band) * GROUP_M
    band_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (t % per_band) % band_rows
    pid_n = (t % per_band) // band_rows
    return pid_m, pid_n


@triton.jit
def _scaled_mma(
    a_desc, b_desc, off_a, off_b, a_s_ptr, a_s_offs, b_s_ptr, b_s_offs, kb_start, kb_count,
    B_SCALE_VEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """FP32 [BLOCK_M, BLOCK_N] = sum over K blocks kb_start.. of a_s*b_s * (a_kb @ b_kb^T).

    a_desc / b_desc: descriptors with [BLOCK_M | BLOCK_N, BLOCK_K] blocks, read at rows off_a /
    off_b. a_s_offs: [BLOCK_M] int32 offsets of each row's block-0 scale from a_s_ptr; b_s_offs:
    the same for b, [BLOCK_N] of them (B_SCALE_VEC) or one (a 128x128 block scale for the whole
    tile). 32-bit offsets rather than 64-bit pointers: a thread of a 64 x 128 wgmma tile holds 32
    columns, whose scale pointers would otherwise take 64 registers."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb_start, kb_start + kb_count):
        a_s = tl.load(a_s_ptr + (a_s_offs + kb))  # issued before the wgmma, consumed after it
        b_s = tl.load(b_s_ptr + (b_s_offs + kb))
        a = a_desc.load([off_a, kb * BLOCK_K])
        b = b_desc.load([off_b, kb * BLOCK_K])
        if B_SCALE_VEC:
            scale = a_s[:, None] * b_s[None, :]
        else:
            scale = a_s[:, None] * b_s
        acc += tl.dot(a, b.T) * scale
    return acc


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _fp8_gemm_kernel(
    a_ptr, a_s_ptr, b_ptr, b_s_ptr, c_ptr, M, N, K, M_BUCKET,
    B_ROW_SCALES: tl.constexpr, C_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    # M_BUCKET: row_bucket(M), read only by the autotuner (its key), never here.
    kb_total = K // BLOCK_K
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    if C_TMA:
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0), warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _swizzle(tile, num_m, num_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        rows = off_m + tl.arange(0, BLOCK_M)
        cols = off_n + tl.arange(0, BLOCK_N)
        # Scales of out-of-range rows/cols: a valid row's (no masks; those outputs are never stored).
        # (The wrappers check that every scale offset fits in int32.)
        a_s_offs = (rows % M) * kb_total
        if B_ROW_SCALES:
            b_s_offs = (cols % N) * kb_total
        elif BLOCK_N > BLOCK_K:
            b_s_offs = ((cols % N) // BLOCK_K) * kb_total
        else:  # the tile lies inside one 128-row block of b: one scale per K block
            b_s_offs = (off_n // BLOCK_K) * kb_total
        acc = _scaled_mma(
            a_desc, b_desc, off_m, off_n, a_s_ptr, a_s_offs, b_s_ptr, b_s_offs, 0, kb_total,
            B_ROW_SCALES or BLOCK_N > BLOCK_K, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        out = _to_output(acc, c_ptr)
        if C_TMA:  # the copy engine clips the rows/cols past M and N
            c_desc.store([off_m, off_n], out)
        else:
            c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
            tl.store(c_ptrs, out, mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _table_row(BLOCK_M: tl.constexpr):
    """Row of the grouped GEMM's table that holds the row-tile prefix for this BLOCK_M."""
    tl.static_assert(BLOCK_M == 16 or BLOCK_M == 32 or BLOCK_M == 64 or BLOCK_M == 128 or BLOCK_M == 256)
    if BLOCK_M == 16:
        row: tl.constexpr = 1
    elif BLOCK_M == 32:
        row: tl.constexpr = 2
    elif BLOCK_M == 64:
        row: tl.constexpr = 3
    elif BLOCK_M == 128:
        row: tl.constexpr = 4
    else:
        row: tl.constexpr = 5
    return row


@triton.jit
def _last_at_or_below(prefix_ptr, G, value, LOG2_G: tl.constexpr):
    """Largest g < G with prefix[g] <= value (prefix non-decreasing, prefix[0] = 0 <= value): a
    binary search of LOG2_G scalar loads, so the tile loop holds no reductions (Triton's Hopper
    warp specialization does not take them inside the loop)."""
    lo = 0
    for step in tl.static_range(LOG2_G):
        probe = lo + (1 << (LOG2_G - 1 - step))
        p = tl.load(prefix_ptr + probe, mask=probe < G, other=2147483647)
        lo = tl.where(p <= value, probe, lo)
    return lo


@triton.jit(do_not_specialize=["T"])
def _fp8_grouped_gemm_kernel(
    a_ptr, a_s_ptr, b_ptr, b_s_ptr, c_ptr, table_ptr, T, G, N, K,
    LOG2_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    # table [1 + len(TABLE_BLOCK_M), G + 1] int32, built on the device (`grouped_gemm_table`): row 0 the
    # groups' first rows (exclusive prefix of the group sizes, ending at <= T); row r the exclusive
    # prefix of the groups' row-tile counts for one BLOCK_M (_table_row). The grid is sized from an
    # upper bound on the tiles; programs past the real tile count find no work.
    # Tile order: expert by expert; inside an expert, GROUP_M swizzle over its row tiles x N tiles,
    # so an expert's activation rows are read for every N column while they are in L2 (and its
    # weights while they are), before its next rows.
    kb_total = K // BLOCK_K
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[T, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    # b [G, N, K] as [G*N, K]: the last column tile of an expert may read the next expert's first
    # rows; those columns are never stored.
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[G * N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    num_n = tl.cdiv(N, BLOCK_N)
    nb_total = tl.cdiv(N, BLOCK_K)
    tile_prefix = table_ptr + _table_row(BLOCK_M) * (G + 1)
    total = tl.load(tile_prefix + G) * num_n
    for tile in tl.range(tl.program_id(0), total, tl.num_programs(0), warp_specialize=WARP_SPECIALIZE):
        group = _last_at_or_below(tile_prefix, G, tile // num_n, LOG2_G)
        first_mt = tl.load(tile_prefix + group)
        row_start = tl.load(table_ptr + group)
        n_rows = tl.load(table_ptr + group + 1) - row_start
        pid_m, pid_n = _swizzle(tile - first_mt * num_n, tl.load(tile_prefix + group + 1) - first_mt, num_n, GROUP_M)
        local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = local < n_rows
        rows = row_start + tl.where(row_ok, local, 0)
        off_n = pid_n * BLOCK_N
        cols = off_n + tl.arange(0, BLOCK_N)
        b_s_first = group * nb_total * kb_total
        if BLOCK_N > BLOCK_K:
            b_s_offs = b_s_first + ((cols % N) // BLOCK_K) * kb_total
        else:
            b_s_offs = b_s_first + (off_n // BLOCK_K) * kb_total
        acc = _scaled_mma(
            a_desc, b_desc, row_start + pid_m * BLOCK_M, group * N + off_n, a_s_ptr, rows * kb_total, b_s_ptr,
            b_s_offs, 0, kb_total, BLOCK_N > BLOCK_K, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        # Masked stores: a tile's last rows may belong to the next expert (a TMA store would
        # overwrite them).
        c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(c_ptrs, _to_output(acc, c_ptr), mask=row_ok[:, None] & (cols[None, :] < N))


@triton.jit(do_not_specialize=["KB_ALL"])
def _fp8_wgrad_grouped_kernel(
    a_ptr, a_s_ptr, b_ptr, b_s_ptr, c_ptr, kb_prefix_ptr, G, N, C, KB_ALL,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    # kb_prefix [G + 1] int32: where each group's 128-aligned token segment starts, in K blocks;
    # KB_ALL: the K blocks of a row (token columns past the last segment are never read).
    # Tile order: group by group (a group's token segment of a and b is read by all of its tiles),
    # GROUP_M swizzle inside a group.
    kb_all = KB_ALL
    t_pad = KB_ALL * BLOCK_K  # a known multiple of 128: a 16-byte aligned descriptor stride
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[N, t_pad], strides=[t_pad, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[C, t_pad], strides=[t_pad, 1], block_shape=[BLOCK_N, BLOCK_K])
    num_m = tl.cdiv(N, BLOCK_M)
    num_n = tl.cdiv(C, BLOCK_N)
    per_group = num_m * num_n
    for tile in tl.range(tl.program_id(0), G * per_group, tl.num_programs(0), warp_specialize=WARP_SPECIALIZE):
        group = tile // per_group
        kb_start = tl.load(kb_prefix_ptr + group)
        kb_count = tl.load(kb_prefix_ptr + group + 1) - kb_start
        pid_m, pid_n = _swizzle(tile - group * per_group, num_m, num_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        rows = off_m + tl.arange(0, BLOCK_M)
        cols = off_n + tl.arange(0, BLOCK_N)
        acc = _scaled_mma(
            a_desc, b_desc, off_m, off_n, a_s_ptr, (rows % N) * kb_all, b_s_ptr, (cols % C) * kb_all, kb_start,
            kb_count, True, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # a group without tokens: zeros
        c_ptrs = c_ptr + group.to(tl.int64) * N * C + rows.to(tl.int64)[:, None] * C + cols[None, :]
        tl.store(c_ptrs, _to_output(acc, c_ptr), mask=(rows[:, None] < N) & (cols[None, :] < C))


# ---- launch configurations ------------------------------------------------------------------------
# Interpreted (CPU tests): small tiles, so that several tiles, partial tiles, partial GROUP_M bands
# and BLOCK_N < 128 (two tiles per scale block) are exercised at tiny sizes; few programs, so that
# each walks several tiles of the persistent loop.
_INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 64, "GROUP_M": 2, "WARP_SPECIALIZE": False}
INTERPRET_PROGRAMS = 3


def _config(bm: int, bn: int, warps: int, stages: int, ws: bool) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8, "WARP_SPECIALIZE": ws},
                         num_warps=warps, num_stages=stages)


# GPU launch configs (all spill-free for sm_90, see moeforge.platform.bench.sass_report). The
# per-block promotion keeps two FP32 tiles live (the running sum and the block's product), so a warp
# group holds at most 64 x 128 of them: 128 x 256 tiles spill on 8 warps, and on a warp-specialized
# consumer too.
GPU_CONFIGS = [
    _config(128, 128, 4, 4, True),  # producer + 2 consumer warp groups (12 warps), 4 TMA stages
    _config(128, 128, 4, 5, True),  # the same, 5 stages (~180 KB of shared memory)
    _config(128, 128, 8, 4, False),  # 2 warp groups, Triton's software pipeline over TMA, no producer
    _config(64, 128, 4, 4, False),  # small M (decode-sized batches, small experts)
    _config(128, 64, 4, 4, False),  # small N
]
WS_CONFIG = GPU_CONFIGS[0]
PLAIN_CONFIG = GPU_CONFIGS[2]


def autotune_configs() -> list[triton.Config]:
    """The configs the autotuner chooses from: GPU_CONFIGS, without the warp-specialized ones unless
    MOEFORGE_WARP_SPECIALIZE=1 (`settings.warp_specialize_autotuning`). An explicit `config=` may still
    name any of them."""
    allow_ws = warp_specialize_autotuning()
    return [c for c in GPU_CONFIGS if allow_ws or not c.kwargs["WARP_SPECIALIZE"]]


@functools.cache
def _num_sms(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _programs(device: torch.device, tiles: int, num_programs: int | None) -> int:
    """The persistent grid: one program per SM not reserved for communication
    (`settings.persistent_programs`); 3 under the interpreter; `num_programs` when given."""
    if num_programs is None and device.type != "cuda":
        num_programs = INTERPRET_PROGRAMS
    sm_count = 0
    if num_programs is None:
        sm_count = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return persistent_programs(sm_count, tiles, num_programs)


def _gemm_kernel(name: str, fn, key: tuple[str, ...]) -> TritonKernel:
    return TritonKernel(name, fn, key, configs=autotune_configs, interpret_meta=_INTERPRET_CONFIG, descriptors=True)


# Autotuning keys: sizes the model fixes, never the data-dependent row / token counts (M's class only).
_gemm = _gemm_kernel("fp8_gemm", _fp8_gemm_kernel, ("M_BUCKET", "N", "K", "B_ROW_SCALES", "C_TMA"))
_grouped = _gemm_kernel("fp8_grouped_gemm", _fp8_grouped_gemm_kernel, ("N", "K"))
_wgrad = _gemm_kernel("fp8_wgrad_grouped_gemm", _fp8_wgrad_grouped_kernel, ("N", "C"))
LAUNCHERS = (_gemm, _grouped, _wgrad)


def _log2_groups(groups: int) -> int:
    return max(groups - 1, 1).bit_length()  # 2**result >= groups


def _check_scale_offsets(*scales: torch.Tensor) -> None:
    """The kernels index the scale matrices with int32 offsets (see _scaled_mma)."""
    for s in scales:
        if s.numel() >= 2**31:
            raise ValueError(f"scale matrix of {s.numel()} elements: the FP8 GEMM kernels index scales with int32")


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """TMA reads from 16-byte aligned addresses: a (rare) misaligned view is copied."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


def fp8_gemm_triton(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    num_programs: int | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """Triton twin of fp8_gemm_torch. num_programs: the persistent grid (default: one program per
    SM not reserved for communication; 3 under the interpreter); config: one of GPU_CONFIGS instead
    of the autotuner's choice."""
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m and n:
        _check_scale_offsets(a_s, b_s)
        row_scales = b_s.shape[0] == n and n != ceil_div(n, BLOCK)
        c_tma = (n * c.element_size()) % 16 == 0 and c.data_ptr() % 16 == 0

        def grid(meta):
            tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
            return (_programs(a.device, tiles, num_programs),)

        _gemm(grid, _aligned(a), a_s, _aligned(b), b_s, c, m, n, k, row_bucket(m), config=config,
              B_ROW_SCALES=row_scales, C_TMA=c_tma, BLOCK_K=BLOCK)
    return c


def grouped_row_tiles_bound(rows: int, groups: int, block_m: int) -> int:
    """At most how many block_m-row tiles `rows` rows cut into `groups` groups give (every group is
    tiled on its own): sum ceil(n_g / block_m) <= (rows + groups * (block_m - 1)) / block_m, and never
    more than the rows. Sizes the grouped GEMM's grid without reading the group sizes."""
    return min(rows, (rows + groups * (block_m - 1)) // block_m)


def fp8_grouped_gemm_triton(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    group_sizes: GroupSizes,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    num_programs: int | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """Triton twin of fp8_grouped_gemm_torch (one persistent launch for all groups). group_sizes: a
    host list or a device tensor; neither is read on the host (`group_tables`)."""
    t, k = a.shape
    g, n, _ = b.shape
    c = torch.empty(t, n, dtype=out_dtype, device=a.device)
    if t and n:
        _check_scale_offsets(a_s, b_s)
        table = grouped_gemm_table(group_sizes, t, a.device)  # int32 [6, G + 1]

        def grid(meta):
            tiles = grouped_row_tiles_bound(t, g, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
            return (_programs(a.device, tiles, num_programs),)

        _grouped(grid, _aligned(a), a_s, _aligned(b), b_s, c, table, t, g, n, k, config=config,
                 LOG2_G=_log2_groups(g), BLOCK_K=BLOCK)
    return c


def fp8_wgrad_grouped_gemm_triton(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    group_sizes: GroupSizes,
    out_dtype: torch.dtype = torch.float32,
    *,
    num_programs: int | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """Triton twin of fp8_wgrad_grouped_gemm_torch (one persistent launch for all groups). The
    groups' segments start at token column 0; columns past the last one are not read."""
    n, t_pad = a.shape
    c_dim = b.shape[0]
    g = len(group_sizes)
    out = torch.empty(g, n, c_dim, dtype=out_dtype, device=a.device)
    if g and n and c_dim and not t_pad:  # no tokens at all: every gradient is zero
        out.zero_()
    elif g and n and c_dim:
        _check_scale_offsets(a_s, b_s)
        kb_prefix = segment_block_prefix(group_sizes, BLOCK, t_pad // BLOCK, a.device)  # int32 [G + 1]

        def grid(meta):
            tiles = g * triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(c_dim, meta["BLOCK_N"])
            return (_programs(a.device, tiles, num_programs),)

        _wgrad(grid, _aligned(a), a_s, _aligned(b), b_s, out, kb_prefix, g, n, c_dim, t_pad // BLOCK, config=config,
               BLOCK_K=BLOCK)
    return out
