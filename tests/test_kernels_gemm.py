"""FP8 GEMMs (public entry points, torch path on CPU) against float64 references and torch._scaled_mm.

The Triton kernels are held to these twins in test_kernels_triton_interpreted.py."""

from __future__ import annotations

import pytest
import torch
from moeforge.kernels.checks import KernelArgumentError
from moeforge.kernels.gemm import fp8_gemm, fp8_grouped_gemm, fp8_wgrad_grouped_gemm
from moeforge.kernels.quant import act_quant, act_quant_transpose, weight_dequant, weight_quant
from moeforge.platform.bench.twin_check import irregular


def gen(seed: int = 3) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


def dequant_rows(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (q.double().unflatten(-1, (-1, 128)) * s.double().unsqueeze(-1)).flatten(-2)


def normal(shape, seed):
    return torch.randn(shape, generator=gen(seed))


@pytest.fixture(scope="module")
def operands():
    x = irregular((67, 384), gen(1), "cpu")  # M = 67, K = 3 blocks
    w = normal((200, 384), 2) * 0.02  # N = 200: a partial 128-row block
    return x, w, act_quant(x), weight_quant(w)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_gemm_equals_float64_product_of_the_dequantized_operands(operands, out_dtype):
    _, _, (xq, xs), (wq, ws) = operands
    out = fp8_gemm(xq, xs, wq, ws, out_dtype=out_dtype)
    assert out.shape == (67, 200) and out.dtype == out_dtype
    ref = dequant_rows(xq, xs) @ weight_dequant(wq, ws).double().t()
    # FP32 out: FP32 rounding only (the 1e-3 goal with a wide margin); BF16 out: one more rounding.
    assert rel_err(out, ref) <= (1e-6 if out_dtype == torch.float32 else 3e-3)


def test_fp8_gemm_tiling_error_against_the_unquantized_operands(operands):
    x, w, (xq, xs), (wq, ws) = operands
    err = rel_err(fp8_gemm(xq, xs, wq, ws, out_dtype=torch.float32), x.double() @ w.double().t())
    print(f"\nfp8_gemm e4m3 tiling error vs unquantized operands (irregular x, normal w): {err:.3e}")
    # e4m3 keeps 3 mantissa bits: each operand carries <= 2^-4 relative rounding error per element.
    assert 1e-3 < err < 0.06


def test_fp8_gemm_equals_blockwise_sum_of_torch_scaled_mm(operands):
    """torch._scaled_mm (rowwise scales) is an independent FP8 implementation: one call per K block
    with that block's scales, summed, is exactly the block-scaled product."""
    _, _, (xq, xs), (wq, ws) = operands
    w_rows = ws.repeat_interleave(128, 0)[:200]  # block scales -> one per row, [N, K/128]
    total = torch.zeros(67, 200, dtype=torch.float32)
    for kb in range(3):
        cols = slice(kb * 128, (kb + 1) * 128)
        total += torch._scaled_mm(
            xq[:, cols].contiguous(), wq[:, cols].contiguous().t(),
            scale_a=xs[:, kb : kb + 1].contiguous(), scale_b=w_rows[:, kb].reshape(1, -1).contiguous(),
            out_dtype=torch.float32,
        )
    assert rel_err(fp8_gemm(xq, xs, wq, ws, out_dtype=torch.float32), total) <= 1e-6


def test_fp8_gemm_with_1x128_scaled_b(operands):
    _, w, (xq, xs), _ = operands
    wq, ws = act_quant(w)  # per-row tiles, as weight-gradient GEMMs use for both operands
    ref = dequant_rows(xq, xs) @ dequant_rows(wq, ws).t()
    assert rel_err(fp8_gemm(xq, xs, wq, ws, out_dtype=torch.float32), ref) <= 1e-6


def test_grouped_gemm_equals_one_gemm_per_expert():
    sizes = [5, 0, 130, 1]
    x = irregular((sum(sizes), 256), gen(4), "cpu")
    w = normal((4, 192, 256), 5) * 0.02
    (xq, xs), (wq, ws) = act_quant(x), weight_quant(w)
    out = fp8_grouped_gemm(xq, xs, wq, ws, torch.tensor(sizes), out_dtype=torch.float32)
    assert out.shape == (136, 192)
    start = 0
    for e, rows in enumerate(sizes):
        sl = slice(start, start + rows)
        if rows:
            ref = dequant_rows(xq[sl], xs[sl]) @ weight_dequant(wq[e], ws[e]).double().t()
            assert rel_err(out[sl], ref) <= 1e-6
        start += rows


def test_wgrad_grouped_gemm_equals_per_expert_weight_gradients():
    sizes = [3, 0, 140]
    grad = normal((143, 96), 6)
    x = irregular((143, 256), gen(7), "cpu")
    gq, gs = act_quant_transpose(grad, group_sizes=sizes)
    xq, xs = act_quant_transpose(x, group_sizes=sizes)
    out = fp8_wgrad_grouped_gemm(gq, gs, xq, xs, sizes)
    assert out.shape == (3, 96, 256) and out.dtype == torch.float32
    assert bool((out[1] == 0).all())  # an expert without tokens gets a zero gradient
    g_deq, x_deq = dequant_rows(gq, gs), dequant_rows(xq, xs)  # [N, T_pad], [C, T_pad]
    for e, (start, width) in enumerate([(0, 128), (128, 0), (128, 256)]):
        if width:
            cols = slice(start, start + width)
            assert rel_err(out[e], g_deq[:, cols] @ x_deq[:, cols].t()) <= 1e-6
    true = grad[3:].double().t() @ x[3:].double()
    err = rel_err(out[2], true)
    print(f"\nwgrad (tokens as K) e4m3 tiling error vs unquantized: {err:.3e}")
    assert err < 0.06


def _ops():
    xq, xs = act_quant(torch.randn(4, 256))
    wq, ws = weight_quant(torch.randn(130, 256))
    return xq, xs, wq, ws


@pytest.mark.parametrize(
    "mutate, arg",
    [
        (lambda a, a_s, b, b_s: (a.float(), a_s, b, b_s), "a"),  # not e4m3
        (lambda a, a_s, b, b_s: (a.view(torch.uint8)[:, :200].view(torch.float8_e4m3fn).contiguous(),
                                 a_s, b, b_s), "a"),  # K = 200
        (lambda a, a_s, b, b_s: (a, a_s, b[:, :128].contiguous(), b_s[:, :1].contiguous()), "b"),  # K mismatch
        (lambda a, a_s, b, b_s: (a, a_s.t().contiguous().t(), b, b_s), "a_s"),  # non-contiguous
        (lambda a, a_s, b, b_s: (a, a_s[:, :1].contiguous(), b, b_s), "a_s"),  # mis-shaped
        (lambda a, a_s, b, b_s: (a, a_s, b, b_s.double()), "b_s"),
        (lambda a, a_s, b, b_s: (a, a_s, b, b_s[:1].contiguous()), "b_s"),
        (lambda a, a_s, b, b_s: (a, a_s, b.t(), b_s), "b"),  # non-contiguous
    ],
)
def test_fp8_gemm_bad_input_names_the_argument(mutate, arg):
    with pytest.raises(KernelArgumentError, match=rf"fp8_gemm: {arg}: "):
        fp8_gemm(*mutate(*_ops()))


def test_grouped_gemm_bad_group_sizes_and_out_dtype():
    xq, xs = act_quant(torch.randn(6, 128))
    wq, ws = weight_quant(torch.randn(2, 64, 128))
    with pytest.raises(KernelArgumentError, match="group_sizes: .*add up to 5"):
        fp8_grouped_gemm(xq, xs, wq, ws, [2, 3])
    with pytest.raises(KernelArgumentError, match="group_sizes: expected 2 entries"):
        fp8_grouped_gemm(xq, xs, wq, ws, [6])
    with pytest.raises(KernelArgumentError, match="out_dtype"):
        fp8_grouped_gemm(xq, xs, wq, ws, [3, 3], out_dtype=torch.int8)
    gq, gs = act_quant_transpose(torch.randn(6, 64), group_sizes=[3, 3])
    xtq, xts = act_quant_transpose(torch.randn(6, 128), group_sizes=[3, 3])
    with pytest.raises(KernelArgumentError, match="group_sizes: segments padded to 128"):
        fp8_wgrad_grouped_gemm(gq, gs, xtq, xts, [6])
