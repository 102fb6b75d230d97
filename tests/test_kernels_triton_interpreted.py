"""Triton kernels (run by Triton's CPU interpreter) against their torch twins.

TRITON_INTERPRET must be set before triton is first imported, and other tests in this process may
already have imported it, so the checks run in a subprocess (moeforge.kernels.twin_check): identical
e4m3 bytes and FP32 scales for the quantizers, FP32-rounding agreement for the GEMMs, on irregular
inputs with partial tiles, exact rounding ties, an empty expert and C not a multiple of 128.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

EXPECTED_CHECKS = [
    "act_quant[float32,None]",
    "act_quant[float32,ue8m0]",
    "act_quant[bfloat16,None]",
    "act_quant[bfloat16,ue8m0]",
    "act_quant_transpose[plain]",
    "act_quant_transpose[grouped]",
    "weight_quant",
    "weight_dequant",
    "fp8_gemm[block,float32]",
    "fp8_gemm[block,bfloat16]",
    "fp8_gemm[rows,float32]",
    "fp8_gemm[rows,bfloat16]",
    "fp8_grouped_gemm",
    "fp8_wgrad_grouped_gemm",
    # whole modules, forward and backward: Triton kernels vs torch twins
    "module:fp8_linear.y",
    "module:fp8_linear.dx",
    "module:fp8_linear.dweight",
    "module:fp8_experts.y",
    "module:fp8_experts.dx",
    "module:fp8_experts.dgate_proj",
    "module:fp8_experts.dup_proj",
    "module:fp8_experts.ddown_proj",
]


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "moeforge.kernels.twin_check", "--size", "tiny", "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert proc.returncode in (0, 1), f"twin_check crashed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def test_public_api_dispatches_to_triton_under_the_interpreter(interpreted):
    assert interpreted["public_api_uses_triton"] is True


def test_every_kernel_was_checked(interpreted):
    assert [row["check"] for row in interpreted["results"]] == EXPECTED_CHECKS


@pytest.mark.parametrize("check", EXPECTED_CHECKS)
def test_triton_kernel_matches_torch_twin(interpreted, check):
    row = next(r for r in interpreted["results"] if r["check"] == check)
    assert row["passed"], row
