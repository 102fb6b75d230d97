"""Gradients through the FP8 quantizers: GRAD_SCALE_FLOOR keeps the range of tiles of tiny gradients,
where the activation floor SCALE_FLOOR (1e-4) flushes them to zero or squeezes them into e4m3's
subnormals.

The bound, per element x of a tile with FP32 scale s (s = max(amax, floor) / 448, or that rounded up
to a power of two for ue8m0) and dequantized value d = e4m3(x / s) * s:

    |x| >= 2^-6 * s  (x / s in e4m3's normal range):   |d - x| <= 2^-4 * |x|   (half a step of a
                                                        3-bit mantissa: the step at 2^e is 2^(e-3))
    |x| <  2^-6 * s  (e4m3 subnormals, step 2^-9):      |d - x| <= 2^-10 * s

each times (1 + 2^-20) for the FP32 rounding of x / s and of q * s. With plain scales the normal range
of a tile is |x| >= amax / (448 * 64) = amax / 28672, whatever the tile's magnitude, once the floor
is below amax. Under SCALE_FLOOR a tile with amax < 1e-4 keeps s = 1e-4 / 448 instead, so its normal
range starts at 3.5e-9 in absolute terms.
"""

from __future__ import annotations

import pytest
import torch
from moeforge.kernels.fp8_format import FP8_MAX, GRAD_SCALE_FLOOR, SCALE_FLOOR
from moeforge.kernels.quant import act_quant, act_quant_transpose

MAGNITUDES = [1e-6, 1e-9, 1e-12, 1e-20]
NORMAL_MIN = 2.0**-6  # smallest normal e4m3 magnitude
REL_HALF_STEP = 2.0**-4  # round to nearest, 3 mantissa bits, relative to |x|
SUB_HALF_STEP = 2.0**-10  # half the subnormal step 2^-9, relative to the scale
FP32_SLACK = 1 + 2.0**-20
TILE = 128
TINY, NORMAL, MIXED = 0, 1, 2  # the three tiles of a gradient_like row


def gradient_like(magnitude: float, rows: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """[rows, 3 * 128]: per row a tile of gradients ~magnitude spread over three decades, a tile ~1,
    and a mixed tile (~magnitude, with one element of 1.0 in it)."""
    gen = torch.Generator().manual_seed(seed)
    spread = torch.logspace(-3, 0, TILE)  # magnitudes inside the tiny tile: 1e-3 .. 1 of `magnitude`
    tiny = torch.randn(rows, TILE, generator=gen, dtype=torch.float64) * spread * magnitude
    normal = torch.randn(rows, TILE, generator=gen, dtype=torch.float64)
    mixed = torch.randn(rows, TILE, generator=gen, dtype=torch.float64) * magnitude
    mixed[torch.arange(rows), torch.randint(0, TILE, (rows,), generator=gen)] = 1.0
    return torch.cat([tiny, normal, mixed], dim=1).to(dtype)  # float64 first: 1e-20 * randn is no FP32 issue


def quantize(
    fn: str, g: torch.Tensor, **kwargs
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, q, per-element scale, dequantized), all laid out [rows, 3 * 128] with tiles along dim 1.

    act_quant gets g [rows, 384]; act_quant_transpose gets g^T [384 tokens, rows] and quantizes along
    the tokens, so its output [rows, 384] has the same tiles."""
    if fn == "act_quant":
        q, s = act_quant(g, **kwargs)
    else:
        q, s = act_quant_transpose(g.t().contiguous(), **kwargs)
    assert q.shape == g.shape and s.shape == (g.shape[0], g.shape[1] // TILE)
    per_elem = s.repeat_interleave(TILE, dim=1)
    return g.float(), q, per_elem, q.float() * per_elem


def relative_ok(x: torch.Tensor, deq: torch.Tensor) -> torch.Tensor:
    return (deq - x).abs() <= REL_HALF_STEP * x.abs() * FP32_SLACK


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
@pytest.mark.parametrize("fn", ["act_quant", "act_quant_transpose"])
@pytest.mark.parametrize("magnitude", MAGNITUDES)
def test_grad_floor_keeps_tiny_gradients_within_e4m3_error(magnitude, fn, scale_fmt, dtype):
    g = gradient_like(magnitude, rows=8, dtype=dtype)
    x, q, s, deq = quantize(fn, g, scale_fmt=scale_fmt, scale_floor=GRAD_SCALE_FLOOR)

    amax = x.unflatten(1, (3, TILE)).abs().amax(-1)  # [rows, 3]
    tile_s = s[:, ::TILE]
    if scale_fmt is None:
        assert torch.equal(tile_s, amax / FP8_MAX)  # the floor is far below every tile: scale = amax / 448
        assert bool((q.float().unflatten(1, (3, TILE)).abs().amax(-1) == FP8_MAX).all())  # full range used
    else:
        assert bool((tile_s >= amax / FP8_MAX).all() and (tile_s < 2 * amax / FP8_MAX).all())
    assert bool((s >= torch.finfo(torch.float32).tiny).all())  # every scale a normal FP32 number

    in_normal_range = x.abs() >= NORMAL_MIN * s
    assert bool(relative_ok(x, deq)[in_normal_range].all())
    assert bool(((deq - x).abs() <= SUB_HALF_STEP * s * FP32_SLACK)[~in_normal_range].all())
    # The tiny tiles are almost entirely in the normal range (only |x| < amax / 28672 is not) ...
    assert in_normal_range[:, :TILE].float().mean() > 0.9
    # ... and nothing that the nearest e4m3 value can hold was flushed to zero.
    assert bool((deq != 0)[x.abs() > SUB_HALF_STEP * s * FP32_SLACK].all())


@pytest.mark.parametrize("fn", ["act_quant", "act_quant_transpose"])
@pytest.mark.parametrize("magnitude", MAGNITUDES)
def test_the_activation_floor_loses_the_range_of_tiny_gradients(magnitude, fn):
    """Why gradients need their own floor: the same tiles under SCALE_FLOOR (the default)."""
    g = gradient_like(magnitude, rows=8, dtype=torch.float32)
    x, q, s, deq = quantize(fn, g)  # scale_floor=SCALE_FLOOR
    _, _, s_grad, _ = quantize(fn, g, scale_floor=GRAD_SCALE_FLOOR)
    tiny = slice(0, TILE)

    assert bool((s[:, tiny] == torch.tensor(SCALE_FLOOR, dtype=torch.float32) / FP8_MAX).all())
    assert float(q[:, tiny].float().abs().max()) < FP8_MAX / 10  # the tiny tiles use < 1/10 of e4m3's range
    # Elements that GRAD_SCALE_FLOOR keeps within 2^-4 (its normal range) fail that bound here.
    kept_by_grad_floor = x[:, tiny].abs() >= NORMAL_MIN * s_grad[:, tiny]
    fails = ~relative_ok(x[:, tiny], deq[:, tiny]) & kept_by_grad_floor
    assert fails.float().mean() > (0.1 if magnitude == 1e-6 else 0.9)
    if magnitude <= 1e-12:
        assert bool((q[:, tiny].float() == 0).all())  # flushed to zero, every one of them
    # The mixed tile (amax 1.0) is no different under either floor: the tiny values in it are below
    # its normal range whatever the floor is. That is per-tile scaling, not the floor.
    mixed = slice(MIXED * TILE, (MIXED + 1) * TILE)
    assert torch.equal(s[:, mixed], s_grad[:, mixed])


@pytest.mark.parametrize("fn", ["act_quant", "act_quant_transpose"])
def test_an_all_zero_gradient_tile_gets_the_smallest_normal_scale(fn):
    g = gradient_like(1e-9, rows=4, dtype=torch.float32)
    g[:, :TILE] = 0.0
    _, q, s, deq = quantize(fn, g, scale_floor=GRAD_SCALE_FLOOR)
    assert bool((s[:, :TILE] == torch.finfo(torch.float32).tiny).all())
    assert bool((q[:, :TILE].float() == 0).all()) and bool(torch.isfinite(deq).all())


def test_act_quant_transpose_pads_tokens_with_the_grad_floor_too():
    g = torch.randn(300, 64, generator=torch.Generator().manual_seed(3)) * 1e-12  # 300 tokens -> 384
    qt, st = act_quant_transpose(g, scale_floor=GRAD_SCALE_FLOOR)
    assert qt.shape == (64, 384) and st.shape == (64, 3)
    amax = torch.nn.functional.pad(g, (0, 0, 0, 84)).t().unflatten(1, (3, TILE)).abs().amax(-1)
    assert torch.equal(st, amax / FP8_MAX)
    assert bool((qt[:, 300:].float() == 0).all())


# --- runs through fp8_linear's backward ------------------------------------------------------------
# Kept last: it checks the backward pass, not the quantizers. It passes only while fp8_linear
# quantizes grad_out with scale_floor=GRAD_SCALE_FLOOR; under SCALE_FLOOR (measured, same inputs)
# dx/dw errors are 3.8% at 1e-6, 12.7% at 1e-9 and 100% at 1e-12 (everything flushed to zero),
# against 3.7% / 3.5% at every scale with the gradient floor.


@pytest.mark.parametrize("grad_scale", [1e-6, 1e-9, 1e-12])
def test_fp8_linear_backward_preserves_tiny_gradients(grad_scale):
    """dx and dw of fp8_linear with grad_out ~ grad_scale against FP32 autograd: relative Frobenius
    error < 0.1. Each e4m3 operand carries at most 2^-4 relative error per element (round to nearest
    with 3 mantissa bits; about 2.5-3% RMS), so a product of two quantized operands sits near 4%,
    whatever the gradient's magnitude as long as its tiles keep their range. 0.1 leaves room for
    that and fails once the gradient tiles drop into e4m3's subnormals."""
    from moeforge.kernels.fp8_linear import fp8_linear

    gen = torch.Generator().manual_seed(5)
    t, k, n = 64, 256, 192  # N not a multiple of 128: grad_out is padded along N for dgrad
    x = torch.randn(t, k, generator=gen)
    w = torch.randn(n, k, generator=gen) * 0.05
    grad_out = torch.randn(t, n, generator=gen) * grad_scale

    x_ref, w_ref = x.clone().requires_grad_(), w.clone().requires_grad_()
    (x_ref @ w_ref.t()).backward(grad_out)
    x_fp8, w_fp8 = x.clone().requires_grad_(), w.clone().requires_grad_()
    fp8_linear(x_fp8, w_fp8).backward(grad_out)

    def rel(got: torch.Tensor, want: torch.Tensor) -> float:
        return float((got.double() - want.double()).norm() / want.double().norm())

    assert rel(x_fp8.grad, x_ref.grad) < 0.1, f"dx: relative error {rel(x_fp8.grad, x_ref.grad):.3g}"
    assert rel(w_fp8.grad, w_ref.grad) < 0.1, f"dw: relative error {rel(w_fp8.grad, w_ref.grad):.3g}"
