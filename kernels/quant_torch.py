"""Pure-torch twins of the quantization kernels in `triton_quant` (same signatures, same bytes).

These are the CPU path and the reference the Triton kernels are held to: the Triton versions must
produce identical e4m3 bytes and identical FP32 scales. Arguments are assumed checked (`quant.act_quant`
and its siblings).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from moeforge.kernels.fp8_format import FP8_MAX, SCALE_FLOOR, ceil_div, round_scale_ue8m0, to_fp8


def _tile_scales(amax: torch.Tensor, scale_fmt: str | None, scale_floor: float = SCALE_FLOOR) -> torch.Tensor:
    scale = amax.clamp(min=scale_floor) / FP8_MAX
    return round_scale_ue8m0(scale) if scale_fmt == "ue8m0" else scale


def act_quant_torch(
    x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None, *, scale_floor: float = SCALE_FLOOR
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (e4m3 [..., K], scales fp32 [..., K / block_size]) with 1 x block_size tiles,
    scale = max(amax, scale_floor) / 448 (see `fp8_format.SCALE_FLOOR` for the floors)."""
    k = x.shape[-1]
    tiles = x.float().reshape(*x.shape[:-1], k // block_size, block_size)  # [..., K/B, B]
    scale = _tile_scales(tiles.abs().amax(dim=-1), scale_fmt, scale_floor)  # [..., K/B]
    q = to_fp8(tiles / scale.unsqueeze(-1)).reshape(x.shape)
    return q.contiguous(), scale.contiguous()  # x may be a transposed view (act_quant_transpose)


def padded_group_rows(x: torch.Tensor, group_sizes: list[int], block_size: int) -> torch.Tensor:
    """Copy each group's rows of x [T, C] to the start of its own block_size-aligned segment
    (zeros in between) -> [sum(round_up(n_g)), C]. Tiles along rows then never straddle groups."""
    segments = []
    for rows in torch.split(x, group_sizes):
        pad = ceil_div(rows.shape[0], block_size) * block_size - rows.shape[0]
        segments.append(F.pad(rows, (0, 0, 0, pad)))
    return torch.cat(segments) if segments else x.new_zeros(0, x.shape[1])


def act_quant_transpose_torch(
    x: torch.Tensor,
    block_size: int = 128,
    group_sizes: list[int] | torch.Tensor | None = None,
    scale_fmt: str | None = None,
    *,
    scale_floor: float = SCALE_FLOOR,
    capacity: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x^T with 1 x block_size tiles along the rows (tokens) of x [T, C].

    -> (e4m3 [C, T_pad], scales fp32 [C, T_pad / block_size]). T_pad rounds T up to the block size;
    with `group_sizes` (rows per group, summing to T) every group is padded separately, so the
    weight-gradient GEMM of each expert reads only its own tokens. Padding is zeros. `capacity`:
    T_pad itself, the columns past the groups' segments holding zero tokens. `scale_fmt` and
    `scale_floor` mean what they mean for act_quant_torch."""
    if group_sizes is None:
        group_sizes = [x.shape[0]]
    elif isinstance(group_sizes, torch.Tensor):
        group_sizes = group_sizes.tolist()  # torch.split needs host sizes
    padded = padded_group_rows(x, group_sizes, block_size)  # [T_pad, C]
    if capacity is not None:
        padded = F.pad(padded, (0, 0, 0, capacity - padded.shape[0]))  # [capacity, C], zero tokens
    return act_quant_torch(padded.t(), block_size, scale_fmt, scale_floor=scale_floor)


def weight_quant_torch(w: torch.Tensor, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (e4m3 [..., N, K], scales fp32 [..., ceil(N / B), K / B]) per B x B block.

    A partial last row block (N not a multiple of B) is scaled over its real rows only."""
    *lead, n, k = w.shape
    nb, kb = ceil_div(n, block_size), k // block_size
    padded = F.pad(w.float(), (0, 0, 0, nb * block_size - n))  # [..., NB*B, K], zero rows
    blocks = padded.reshape(*lead, nb, block_size, kb, block_size)  # [..., NB, B, KB, B]
    scale = _tile_scales(blocks.abs().amax(dim=(-3, -1)), None)  # [..., NB, KB]
    q = to_fp8(blocks / scale[..., :, None, :, None]).reshape(*lead, nb * block_size, k)
    return q[..., :n, :].contiguous(), scale


def expand_block_scales(scales: torch.Tensor, rows: int, block_size: int = 128) -> torch.Tensor:
    """Block scales [..., NB, KB] -> per-row tile scales [..., rows, KB] (each block row repeated)."""
    return scales.repeat_interleave(block_size, dim=-2)[..., :rows, :]


def weight_dequant_torch(
    w_fp8: torch.Tensor, scales: torch.Tensor, block_size: int = 128, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """e4m3 [..., N, K] with block scales [..., NB, KB] -> dtype [..., N, K]."""
    *lead, n, k = w_fp8.shape
    rows = expand_block_scales(scales, n, block_size)  # [..., N, KB]
    tiles = w_fp8.float().reshape(*lead, n, k // block_size, block_size)
    return (tiles * rows.unsqueeze(-1)).reshape(w_fp8.shape).to(dtype)
