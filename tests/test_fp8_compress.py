"""FP8 compression of MoE dispatch tokens: about half of BF16's bytes, bounded round-trip error."""

from __future__ import annotations

import pytest
import torch
from moeforge.kernels.checks import KernelArgumentError
from moeforge.kernels.token_compress import compress_tokens, decompress_tokens
from moeforge.platform.bench.twin_check import irregular


def test_payload_is_about_half_of_bf16_and_round_trips():
    x = irregular((64, 7168), torch.Generator().manual_seed(0), "cpu", torch.bfloat16)
    payload, scales = compress_tokens(x)
    assert payload.dtype == scales.dtype == torch.uint8
    assert payload.shape == (64, 7168) and scales.shape == (64, 56)
    ratio = (payload.numel() + scales.numel()) / (x.numel() * x.element_size())
    assert ratio == pytest.approx((7168 + 56) / (2 * 7168))  # 0.504
    y = decompress_tokens(payload, scales)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    err = float((y.double() - x.double()).norm() / x.double().norm())
    print(f"\ndispatch compression: bytes ratio {ratio:.4f}, round-trip relative error {err:.3e}")
    assert 1e-3 < err < 0.05
    # Each value is within half an e4m3 step of the original (power-of-two scales are exact).
    scale = (scales.to(torch.int32) << 23).view(torch.float32).repeat_interleave(128, -1)
    assert bool(((y.float() - x.float()).abs() <= x.float().abs() * 2**-4 + scale * 2**-10 + x.float().abs() * 2**-8).all())


def test_decompress_refuses_mismatched_scales():
    payload, scales = compress_tokens(torch.randn(4, 256))
    with pytest.raises(KernelArgumentError, match="decompress_tokens: scales"):
        decompress_tokens(payload, scales[:, :1])
    with pytest.raises(KernelArgumentError, match="decompress_tokens: payload"):
        decompress_tokens(payload.view(torch.float8_e4m3fn), scales)
    with pytest.raises(KernelArgumentError, match="compress_tokens: x"):
        compress_tokens(torch.randn(4, 100))
