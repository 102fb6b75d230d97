"""The GPU tolerance of the FP8 GEMMs (kernels/tolerance.py) against the CPU emulation of the
accumulation model it is derived from: the emulated errors stay under the tolerance on several
kinds of data, the tolerance is not loose by more than 10x, and a kernel that skipped the per-128-K
promotion would fail it."""

from __future__ import annotations

import pytest
import torch
from moeforge.kernels import tolerance
from moeforge.kernels.gemm_torch import dequant_rows
from moeforge.kernels.quant_torch import act_quant_torch, expand_block_scales, weight_quant_torch
from moeforge.platform.bench.twin_check import irregular
from triton_interpreter import twin_row_problems

M, N, K = 48, 40, 1024


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def _data(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    if kind == "gaussian":
        return torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen) * 0.02
    if kind == "one_signed":  # every product positive: the truncation bias never cancels
        return torch.randn(M, K, generator=gen).abs(), torch.randn(N, K, generator=gen).abs()
    return irregular((M, K), gen, "cpu"), torch.randn(N, K, generator=gen) * 0.02  # twin_check's data


@pytest.fixture(scope="module", params=["gaussian", "one_signed", "irregular"])
def emulated(request):
    """(exact product of the quantized operands, the model's GPU result), float64."""
    x, w = _data(request.param)
    (aq, a_s), (bq, b_s) = act_quant_torch(x), weight_quant_torch(w)
    b_rows = expand_block_scales(b_s, N)
    exact = dequant_rows(aq, a_s).double() @ dequant_rows(bq, b_rows).double().t()
    return exact, tolerance.emulate_fp8_gemm(aq, a_s, bq, b_rows)


def test_emulated_fp32_error_is_under_the_tolerance_and_near_the_model(emulated):
    exact, gpu = emulated
    err, tol = rel(gpu, exact), tolerance.gemm_tolerance(K)
    rho = tolerance.accumulation_rms(K)
    print(f"\nemulated {err:.2e}, model rms {rho:.2e}, tolerance {tol:.2e}")
    assert err <= tol
    assert tol <= 10 * err  # not absurdly loose
    assert 0.5 * rho <= err <= 1.5 * rho  # the derivation itself, at the default group of 32


def test_emulated_bf16_output_error_is_under_the_tolerance(emulated):
    exact, gpu = emulated
    err = rel(gpu.float().bfloat16(), exact.float().bfloat16())
    tol = tolerance.gemm_tolerance(K, torch.bfloat16)
    assert err <= tol <= 10 * err


def test_requantized_chain_is_under_its_tolerance(emulated, request):
    """A second GEMM on the first one's output quantized to e4m3 again (as inside the FP8 experts):
    the flips of the re-quantization dominate, formula (2). Errors of one sign across a tile move
    its scale with its values and flip fewer elements than (2) counts: there the tolerance is loose
    (one-signed data: no flip at all), so its looseness is bounded on Gaussian data only."""
    exact, gpu = emulated
    w2 = torch.randn(24, N, generator=torch.Generator().manual_seed(8)) * 0.05
    w2q, w2s = weight_quant_torch(torch.nn.functional.pad(w2, (0, 128 - N)))
    w2_deq = dequant_rows(w2q, expand_block_scales(w2s, 24)).double()

    def second(y: torch.Tensor) -> torch.Tensor:
        yq, ys = act_quant_torch(torch.nn.functional.pad(y.float(), (0, 128 - N)))
        return dequant_rows(yq, ys).double() @ w2_deq.t()

    err, tol = rel(second(gpu), second(exact)), tolerance.gemm_tolerance(128, requantized=1)
    assert err <= tol
    if request.node.callspec.params["emulated"] == "gaussian":
        assert tol <= 10 * err


@pytest.mark.parametrize("group", [32, 4])
def test_skipping_the_promotion_fails_the_tolerance(group):
    """Unit scales (a kernel without promotion cannot apply per-block scales anyway): one
    tensor-core sum over all of K has many times the error of 128-K chunks."""
    gen = torch.Generator().manual_seed(9)
    a = torch.randn(M, K, generator=gen).to(torch.float8_e4m3fn)
    b = torch.randn(N, K, generator=gen).to(torch.float8_e4m3fn)
    ones_a, ones_b = torch.ones(M, K // 128), torch.ones(N, K // 128)
    exact = a.double() @ b.double().t()
    promoted = rel(tolerance.emulate_fp8_gemm(a, ones_a, b, ones_b, group=group), exact)
    unpromoted = rel(tolerance.emulate_fp8_gemm(a, ones_a, b, ones_b, group=group, chunk=None), exact)
    tol = tolerance.gemm_tolerance(K, group=group)
    assert promoted <= tol < unpromoted
    assert unpromoted > 4 * promoted


def test_the_model_is_pessimistic_for_single_product_steps():
    """group=1 over-estimates (module docstring): the bound still holds there."""
    x, w = _data("gaussian")
    (aq, a_s), (bq, b_s) = act_quant_torch(x), weight_quant_torch(w)
    b_rows = expand_block_scales(b_s, N)
    exact = dequant_rows(aq, a_s).double() @ dequant_rows(bq, b_rows).double().t()
    err = rel(tolerance.emulate_fp8_gemm(aq, a_s, bq, b_rows, group=1), exact)
    assert err <= tolerance.accumulation_rms(K, group=1) <= 12 * err


def test_tolerance_figures_and_arguments():
    assert tolerance.gemm_tolerance(7168) == pytest.approx(5.1e-4, rel=0.02)
    assert tolerance.gemm_tolerance(128) == pytest.approx(
        tolerance.gemm_tolerance(7168), rel=1e-3
    )  # per chunk
    assert tolerance.gemm_tolerance(7168, torch.bfloat16) > tolerance.gemm_tolerance(7168)
    assert tolerance.gemm_tolerance(7168, requantized=2) > tolerance.gemm_tolerance(7168, requantized=1)
    assert tolerance.accumulation_rms(7168, rounding="nearest") < tolerance.accumulation_rms(7168) / 2
    assert tolerance.accumulation_rms(7168, acc_bits=24) < 1e-6
    with pytest.raises(ValueError, match="rounding"):
        tolerance.accumulation_rms(128, rounding="up")


def test_gpu_twin_check_path_runs_under_the_interpreter():
    """What twin_check does on CUDA (model tolerances, every launch config, the re-quantization
    stages of the module checks), run through Triton's interpreter: the GPU check's own code works
    before any GPU sees it. (Under the interpreter each config runs the same exact-FP32 kernel.)"""
    import json
    import os
    import subprocess
    import sys

    from moeforge.kernels.triton_gemm import GPU_CONFIGS

    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moeforge.platform.bench.twin_check",
            "--size",
            "tiny",
            "--device",
            "cpu",
            "--compiled-checks",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    rows = {row["check"]: row for row in json.loads(proc.stdout)["results"]}
    # the verdict recomputed from each row's figures (every value row carries its model tolerance),
    # and the exit status agrees with it
    problems = {check: twin_row_problems(row, row.get("tol")) for check, row in rows.items()}
    assert {check: p for check, p in problems.items() if p} == {}
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i in range(len(GPU_CONFIGS)):
        for kernel in ("fp8_gemm", "fp8_grouped_gemm", "fp8_wgrad_grouped_gemm"):
            assert f"{kernel}[config={i}]" in rows
    assert rows["fp8_gemm[block,float32]"]["tol"] == tolerance.gemm_tolerance(256)
    assert rows["fp8_gemm[block,bfloat16]"]["tol"] == tolerance.gemm_tolerance(256, torch.bfloat16)
    assert (
        rows["module:fp8_experts.dx"]["tol"]
        > rows["module:fp8_experts.y"]["tol"]
        > rows["module:fp8_linear.y"]["tol"]
    )
    assert "rel_err" in proc.stderr and "<=" in proc.stderr  # each GEMM row prints its error and bound
