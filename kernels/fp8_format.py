"""The FP8 block-scaling format shared by every kernel, twin and module in kernels/.

DeepSeek-V3's fine-grained recipe: activations are scaled per 1x128 tile (one scale per token per 128
channels), weights per 128x128 block, all scales FP32. A scale maps a tile's largest magnitude onto
the largest finite e4m3 value, so nothing saturates and small tiles keep their resolution:

    scale = max(amax(tile), floor) / FP8_MAX        q = e4m3(x / scale)        x ~ q * scale

`ue8m0` scales (used for the MoE dispatch payload) are rounded *up* to a power of two, so they fit in
one exponent byte and the division stays exact.

Two amax floors, chosen per call (`scale_floor=` of act_quant / act_quant_transpose):

- SCALE_FLOOR (1e-4, the default) is DeepSeek-V3's inference activation floor. Activations are O(1),
  so it only catches all-zero and near-zero tiles.
- GRAD_SCALE_FLOOR (448 * 2^-126 ~ 5.3e-36) is for gradients, whose tiles are routinely 1e-6 .. 1e-20
  (late in training, or behind a small loss scale). Under SCALE_FLOOR such a tile's scale stays at
  1e-4 / 448: its values land in e4m3's subnormals or flush to zero. GRAD_SCALE_FLOOR is the smallest
  amax whose scale amax / 448 is still a normal FP32 number, so every tile down to there maps its own
  amax onto 448 and keeps the full e4m3 range.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_FLOOR = 1e-4  # amax floor: an all-zero tile gets a finite, tiny scale instead of 0/0
# The gradient floor: amax / 448 >= 2^-126, the smallest normal FP32 (exactly: 448 * 2^-126 = 7 * 2^-120
# is an FP32 number, and dividing it by 448 is exact). Any lower and the scale would be subnormal: it
# carries fewer mantissa bits (amax / scale then misses 448 and x ~ q * scale loses accuracy), a
# flush-to-zero GPU path reads it as 0 (x / 0 = inf/NaN), 1 / scale can overflow, and
# round_scale_ue8m0 works on normal scales. A tile below the floor (amax < 5.3e-36, near FP32's own
# underflow) keeps the 2^-126 scale and uses only part of the e4m3 range, as tiles below 1e-4 do
# under SCALE_FLOOR.
# An all-zero tile still gets a positive scale (2^-126), so it quantizes to zeros, never NaN.
GRAD_SCALE_FLOOR = FP8_MAX * torch.finfo(torch.float32).tiny
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


def token_capacity(tokens: int, groups: int, block: int = BLOCK) -> int:
    """Token columns that always hold `tokens` tokens cut into `groups` groups when every group is
    padded to its own multiple of `block` (act_quant_transpose's grouped layout), whatever the group
    sizes: sum round_up(n_g) <= tokens + groups * (block - 1), rounded down to a block multiple
    (the sum is one). Lets a caller size that layout without reading sizes held on the device."""
    return (tokens + max(groups, 1) * (block - 1)) // block * block
