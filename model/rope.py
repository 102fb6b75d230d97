"""Rotary position embedding for MLA's decoupled rope dims, with YaRN context extension.

DeepSeek rotates *interleaved* pairs (x0, x1), (x2, x3), ... each by one frequency. We keep that
interleaved layout (the query and key get the same treatment, so attention scores equal those of
Hugging Face's de-interleaving formulation exactly; only the storage order of the rotated dims
differs, and it never leaves this model).

The tables are computed on the fly from the config (a few dozen frequencies): no buffers, so a model
built on the meta device and materialised with `to_empty` needs no re-initialisation here.
"""

from __future__ import annotations

import math

import torch
from moeforge.model.config import ModelConfig, RopeScaling
from torch import nn


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(dim: int, theta: float, scaling: RopeScaling | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim // 2] (fp32) and the factor applied to cos/sin (1.0 without YaRN).

    YaRN: frequencies whose wavelength is short compared with the original context (more than
    beta_fast rotations over it) are kept; those with fewer than beta_slow rotations are divided by
    `factor` (interpolated); a linear ramp over the dimension index blends the two in between.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    if scaling is None:
        return inv_freq, 1.0
    factor = scaling.factor
    orig = scaling.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        # the dimension index whose frequency makes `rotations` turns over the original context
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    high = min(math.ceil(correction_dim(scaling.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    inv_freq = (inv_freq / factor) * (1.0 - keep) + inv_freq * keep
    if scaling.mscale and scaling.mscale_all_dim:
        attention_factor = _yarn_mscale(factor, scaling.mscale) / _yarn_mscale(factor, scaling.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(factor)
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions [start, start + length), computed per call (no state)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dim = cfg.qk_rope_head_dim
        inv_freq, self.attention_factor = rope_frequencies(self.dim, cfg.rope_theta, cfg.rope_scaling)
        self._inv_freq_cpu = inv_freq  # a plain attribute, not a buffer: see the module docstring
        self._per_device: dict[torch.device, torch.Tensor] = {}

    def forward(self, start: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [length, dim // 2] fp32."""
        inv_freq = self._per_device.get(device)
        if inv_freq is None:
            inv_freq = self._per_device[device] = self._inv_freq_cpu.to(device)
        pos = torch.arange(start, start + length, device=device, dtype=torch.float32)
        angles = pos[:, None] * inv_freq[None, :]  # [length, dim/2]
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [b, s, heads, dim] by cos/sin [s, dim/2]; same shape and dtype."""
    dtype = x.dtype
    pairs = x.float().unflatten(-1, (-1, 2))  # [b, s, h, dim/2, 2]
    even, odd = pairs[..., 0], pairs[..., 1]
    cos = cos[None, :, None, :]  # [1, s, 1, dim/2]
    sin = sin[None, :, None, :]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)  # [b, s, h, dim/2, 2]
    return rotated.flatten(-2).to(dtype)  # [b, s, h, dim]
