"""FP8 compression of the token activations that the MoE dispatch all-to-all moves between ranks.

Each token's hidden vector is cut into 1x128 tiles; each tile is stored as e4m3 bytes with one
power-of-two (ue8m0) scale kept as its 8-bit biased exponent. Per 7168-wide token that is 7168 + 56
bytes instead of 14336 in BF16: about half the all-to-all traffic (DeepSeek-V3 dispatches in FP8).
Power-of-two scales make the decompression exact up to the e4m3 rounding of the tile.
"""

from __future__ import annotations

import torch
from moeforge.kernels.checks import check_block_multiple, check_high_precision, fail
from moeforge.kernels.fp8_format import BLOCK, FP8_DTYPE
from moeforge.kernels.quant import act_quant


def compress_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] (D a multiple of 128) -> (payload uint8 [..., D] (e4m3 bits), scales uint8 [..., D/128]
    (biased exponents: scale = 2^(e - 127)))."""
    op = "compress_tokens"
    check_high_precision(op, "x", x)
    check_block_multiple(op, "x", x.shape[-1], BLOCK, "hidden size (last dimension)")
    q, scales = act_quant(x, BLOCK, scale_fmt="ue8m0")
    exponents = (scales.view(torch.int32) >> 23).to(torch.uint8)  # power of two: the exponent is all
    return q.view(torch.uint8), exponents


def decompress_tokens(
    payload: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Inverse of compress_tokens -> dtype [..., D]."""
    op = "decompress_tokens"
    for name, t in (("payload", payload), ("scales", scales)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
            fail(op, name, f"expected a uint8 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    d = payload.shape[-1]
    check_block_multiple(op, "payload", d, BLOCK, "last dimension")
    if tuple(scales.shape) != (*payload.shape[:-1], d // BLOCK):
        fail(op, "scales", f"expected shape {[*payload.shape[:-1], d // BLOCK]}, got {list(scales.shape)}")
    scale = (scales.to(torch.int32) << 23).view(torch.float32)  # [..., D/128]
    tiles = payload.contiguous().view(FP8_DTYPE).float().unflatten(-1, (d // BLOCK, BLOCK))
    return (tiles * scale.unsqueeze(-1)).flatten(-2).to(dtype)
