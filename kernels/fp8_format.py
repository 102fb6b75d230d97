"""The FP8 block-scaling format shared by every kernel, twin and module in kernels/.

DeepSeek-V3's fine-grained recipe: activations are scaled per 1x128 tile (one scale per token per 128
channels), weights per 128x128 block, all scales FP32. A scale maps a tile's largest magnitude onto
the largest finite e4m3 value, so nothing saturates and small tiles keep their resolution:

    scale = max(amax(tile), SCALE_FLOOR) / FP8_MAX        q = e4m3(x / scale)        x ~ q * scale

`ue8m0` scales (used for the MoE dispatch payload) are rounded *up* to a power of two, so they fit in
one exponent byte and the division stays exact.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_FLOOR = 1e-4  # amax floor: an all-zero tile gets a finite, tiny scale instead of 0/0
BLOCK = 128  # tile width along the reduced dimension; the GEMMs apply scales per 128-wide K block
HIGH_PRECISION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return ceil_div(a, b) * b


def round_scale_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Round positive normal FP32 scales up to the next power of two (exact, on the bits).

    A log2/ceil formulation can round 2^k * (1 + 2^-23) down to 2^k in FP32, which would push
    x / scale past FP8_MAX; incrementing the exponent whenever a mantissa bit is set cannot."""
    bits = scale.contiguous().view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    exponent = exponent + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exponent << 23).view(torch.float32)


def to_fp8(y: torch.Tensor) -> torch.Tensor:
    """FP32 -> e4m3 with round-to-nearest-even, saturating at +-FP8_MAX (torch would give NaN)."""
    return y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
