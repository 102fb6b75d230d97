"""Triton kernels (run by Triton's CPU interpreter) against their torch twins.

TRITON_INTERPRET must be set before triton is first imported, and other tests in this process may
already have imported it, so the checks run in a subprocess (moeforge.platform.bench.twin_check):
identical e4m3 bytes and FP32 scales for the quantizers, FP32-rounding agreement for the GEMMs, on
irregular inputs with partial tiles, exact rounding ties, an empty expert and C not a multiple of 128.
The interpreter runs the GEMM kernels' compiled source itself: tensor descriptors (TMA on sm_90),
the persistent tile loop with its GROUP_M swizzle and the expert-major tile order; only warp
specialization is a compiler transformation it does not see (test_kernels_sass.py checks that the
compiled code has it).

The quantizers' `scale_floor` (GRAD_SCALE_FLOOR, on gradient-sized inputs) and act_quant_transpose's
`scale_fmt="ue8m0"` are held to their twins the same way by SCALE_ARG_SCRIPT below.
"""

from __future__ import annotations

import pytest
from moeforge.platform.bench.twin_check import GEMM_TOL
from triton_interpreter import QUANTIZER_CHECKS, run_interpreted, twin_row_problems

# Triton vs torch twin for the scale arguments, run under the interpreter: one JSON row per case.
SCALE_ARG_SCRIPT = r"""
import json
import torch
from moeforge.kernels import quant_torch, triton_quant
from moeforge.kernels.fp8_format import GRAD_SCALE_FLOOR, SCALE_FLOOR
from moeforge.platform.bench.twin_check import irregular

gen = torch.Generator().manual_seed(0)
rows = []

def same(name, got, want):
    q_same = torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
    rows.append({"check": name, "passed": q_same and torch.equal(got[1], want[1]), "bytes_equal": q_same})

def gradient(shape, dtype):
    # irregular() spans nine decades per row; times 1e-12, with one all-zero tile and one tile ~1
    x = irregular(shape, gen, "cpu") * 1e-12
    x[1, :128] = 0.0
    x[2, -128:] = x[2, -128:] * 1e12
    return x.to(dtype)

for dtype in (torch.float32, torch.bfloat16):
    x = gradient((37, 256), dtype)
    for fmt in (None, "ue8m0"):
        name = f"act_quant[grad_floor,{str(dtype)[6:]},{fmt}]"
        same(name, triton_quant.act_quant_triton(x, 128, fmt, scale_floor=GRAD_SCALE_FLOOR),
             quant_torch.act_quant_torch(x, 128, fmt, scale_floor=GRAD_SCALE_FLOOR))
groups = [10, 0, 27]
xt = gradient((37, 192), torch.bfloat16)  # C not a multiple of 128
for floor_name, floor in (("act_floor", SCALE_FLOOR), ("grad_floor", GRAD_SCALE_FLOOR)):
    for fmt in (None, "ue8m0"):
        for label, sizes in (("plain", None), ("grouped", groups)):
            if floor_name == "act_floor" and fmt is None:
                continue  # twin_check's act_quant_transpose rows
            name = f"act_quant_transpose[{floor_name},{fmt},{label}]"
            same(name, triton_quant.act_quant_transpose_triton(xt, 128, sizes, fmt, scale_floor=floor),
                 quant_torch.act_quant_transpose_torch(xt, 128, sizes, fmt, scale_floor=floor))
print(json.dumps(rows))
"""
SCALE_ARG_CHECKS = [
    "act_quant[grad_floor,float32,None]",
    "act_quant[grad_floor,float32,ue8m0]",
    "act_quant[grad_floor,bfloat16,None]",
    "act_quant[grad_floor,bfloat16,ue8m0]",
    "act_quant_transpose[act_floor,ue8m0,plain]",
    "act_quant_transpose[act_floor,ue8m0,grouped]",
    "act_quant_transpose[grad_floor,None,plain]",
    "act_quant_transpose[grad_floor,None,grouped]",
    "act_quant_transpose[grad_floor,ue8m0,plain]",
    "act_quant_transpose[grad_floor,ue8m0,grouped]",
]

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
    "fp8_gemm[block,bfloat16,pitch]",  # no TMA store: the row pitch is not 16-byte aligned
    "fp8_gemm[programs=1]",  # persistent grids: one program walks every tile, then 7 programs
    "fp8_gemm[programs=7]",
    "fp8_grouped_gemm",
    "fp8_grouped_gemm[empty ends,bfloat16]",
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
    return run_interpreted(
        ["-m", "moeforge.platform.bench.twin_check", "--size", "tiny", "--device", "cpu"],
        "twin_check",
        ok_codes=(0, 1),
    )


def test_public_api_dispatches_to_triton_under_the_interpreter(interpreted):
    assert interpreted["public_api_uses_triton"] is True


def test_every_kernel_was_checked(interpreted):
    assert [row["check"] for row in interpreted["results"]] == EXPECTED_CHECKS


@pytest.mark.parametrize("check", EXPECTED_CHECKS)
def test_triton_kernel_matches_torch_twin(interpreted, check):
    """The verdict recomputed from the row's figures: identical bytes for a quantizer; FP32 outputs
    within twin_check.GEMM_TOL (the bound the row says it was held to); BF16 outputs at most one
    bf16 step off, in at most 1% of the elements."""
    row = next(r for r in interpreted["results"] if r["check"] == check)
    tol = None
    if not check.startswith(QUANTIZER_CHECKS) and row.get("dtype") != "bfloat16":
        assert row.get("tol") == GEMM_TOL, row
        tol = GEMM_TOL
    assert twin_row_problems(row, tol) == [], row


@pytest.fixture(scope="module")
def interpreted_scale_args() -> list[dict]:
    return run_interpreted(["-c", SCALE_ARG_SCRIPT], "scale-argument check")


def test_every_scale_argument_case_was_checked(interpreted_scale_args):
    assert [row["check"] for row in interpreted_scale_args] == SCALE_ARG_CHECKS


@pytest.mark.parametrize("check", SCALE_ARG_CHECKS)
def test_triton_quantizer_matches_torch_twin_with_scale_arguments(interpreted_scale_args, check):
    row = next(r for r in interpreted_scale_args if r["check"] == check)
    assert row["passed"], row
