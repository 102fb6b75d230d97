"""Group sizes held on the device, through the Triton kernels (CPU interpreter) against the torch twins:
act_quant_transpose's capacity layout (the groups' segments, then zero tokens: a width that does not
depend on the sizes), the grouped GEMMs taking the counts tensor instead of a host list, and counts
that do not add up clamped, never reaching memory outside the operands. On CPU without the
interpreter, the capacity layout's twin semantics and argument checks."""

from __future__ import annotations

import pytest
import torch
from moeforge.kernels.checks import KernelArgumentError
from moeforge.kernels.fp8_format import token_capacity
from moeforge.kernels.quant import act_quant_transpose
from moeforge.kernels.quant_torch import act_quant_transpose_torch
from triton_interpreter import run_interpreted

SCRIPT = r"""
import json
import torch
from moeforge.kernels import gemm_torch, quant_torch, triton_gemm, triton_quant
from moeforge.kernels.fp8_format import token_capacity
from moeforge.kernels.gemm import fp8_grouped_gemm, fp8_wgrad_grouped_gemm
from moeforge.kernels.quant import act_quant_transpose
from moeforge.platform.bench.twin_check import irregular

gen = torch.Generator().manual_seed(0)
rows = []

def same(name, got, want):
    rows.append({"check": name, "passed": all(torch.equal(g.view(torch.uint8) if g.dtype == torch.float8_e4m3fn else g,
                                                          w.view(torch.uint8) if w.dtype == torch.float8_e4m3fn else w)
                                              for g, w in zip(got, want))})

def close(name, got, want):
    err = ((got.double() - want.double()).norm() / want.double().norm()).item()
    rows.append({"check": name, "passed": err <= 1e-5, "rel_err": err})

sizes = [10, 0, 27, 130, 1]
t = sum(sizes)
counts = torch.tensor(sizes)
cap = token_capacity(t, len(sizes))
x = irregular((t, 192), gen, "cpu", torch.bfloat16)
for fmt in (None, "ue8m0"):
    same(f"act_quant_transpose[capacity,{fmt}]",
         triton_quant.act_quant_transpose_triton(x, 128, counts, fmt, capacity=cap),
         quant_torch.act_quant_transpose_torch(x, 128, sizes, fmt, capacity=cap))
same("act_quant_transpose[public,tensor,capacity]", act_quant_transpose(x, group_sizes=counts, capacity=cap),
     quant_torch.act_quant_transpose_torch(x, 128, sizes, capacity=cap))

w = quant_torch.weight_quant_torch(irregular((len(sizes), 200, 256), gen, "cpu"))
a = quant_torch.act_quant_torch(irregular((t, 256), gen, "cpu"))
close("fp8_grouped_gemm[tensor]", fp8_grouped_gemm(*a, *w, counts, torch.float32),
      gemm_torch.fp8_grouped_gemm_torch(*a, *w, sizes, torch.float32))
g_t = quant_torch.act_quant_transpose_torch(irregular((t, 200), gen, "cpu"), 128, sizes, capacity=cap)
x_t = quant_torch.act_quant_transpose_torch(irregular((t, 256), gen, "cpu"), 128, sizes, capacity=cap)
close("fp8_wgrad_grouped_gemm[tensor,capacity]", fp8_wgrad_grouped_gemm(*g_t, *x_t, counts),
      gemm_torch.fp8_wgrad_grouped_gemm_torch(*g_t, *x_t, sizes))

# Counts that do not add up to the rows: clamped (each group's rows end at T), so the kernels read
# and write only the operands: the result is the twin's on the clamped counts.
bad = torch.tensor([30, -5, 200, 9])
clamped = [30, 0, t - 30, 0]
w4 = tuple(p[:4].contiguous() for p in w)
close("fp8_grouped_gemm[counts past the rows]", triton_gemm.fp8_grouped_gemm_triton(*a, *w4, bad, torch.float32),
      gemm_torch.fp8_grouped_gemm_torch(*a, *w4, clamped, torch.float32))
same("act_quant_transpose[counts past the rows]",
     triton_quant.act_quant_transpose_triton(x, 128, bad, capacity=token_capacity(t, 4)),
     quant_torch.act_quant_transpose_torch(x, 128, clamped, capacity=token_capacity(t, 4)))
print(json.dumps(rows))
"""
CHECKS = [
    "act_quant_transpose[capacity,None]",
    "act_quant_transpose[capacity,ue8m0]",
    "act_quant_transpose[public,tensor,capacity]",
    "fp8_grouped_gemm[tensor]",
    "fp8_wgrad_grouped_gemm[tensor,capacity]",
    "fp8_grouped_gemm[counts past the rows]",
    "act_quant_transpose[counts past the rows]",
]


@pytest.fixture(scope="module")
def interpreted() -> list[dict]:
    return run_interpreted(["-c", SCRIPT], "device-group check")


def test_every_case_was_checked(interpreted):
    assert [row["check"] for row in interpreted] == CHECKS


@pytest.mark.parametrize("check", CHECKS)
def test_triton_with_device_counts_matches_the_twin(interpreted, check):
    row = next(r for r in interpreted if r["check"] == check)
    assert row["passed"], row


def test_token_capacity_bounds_every_grouped_layout():
    for sizes in ([0, 0, 0], [1, 1, 1], [127, 129, 0], [128, 256], [5] * 8, [1000, 1, 0, 300]):
        exact = sum(-(-n // 128) * 128 for n in sizes)
        cap = token_capacity(sum(sizes), len(sizes))
        assert cap % 128 == 0 and exact <= cap < exact + 128 * len(sizes)


def test_capacity_layout_is_the_exact_layout_then_zero_tokens():
    x = torch.randn(70, 128) * 3
    sizes = [20, 50]
    exact = act_quant_transpose(x, group_sizes=sizes)
    for group_sizes in (sizes, torch.tensor(sizes)):
        q, s = act_quant_transpose(x, group_sizes=group_sizes, capacity=384)
        assert q.shape == (128, 384) and s.shape == (128, 3)
        width = exact[0].shape[1]
        assert torch.equal(q[:, :width].view(torch.uint8), exact[0].view(torch.uint8))
        assert torch.equal(s[:, : width // 128], exact[1])
        assert not q[:, width:].view(torch.uint8).any()  # zero tokens
        assert torch.equal(s[:, width // 128 :], act_quant_transpose_torch(torch.zeros(128, 128))[1])


@pytest.mark.parametrize("capacity", [256, 128, 300, 128 * 3 + 1, True])
def test_capacity_must_hold_any_grouping(capacity):
    # 70 tokens in 2 groups may need token_capacity(70, 2) = 256 columns: 256 is fine, the others not
    if capacity == 256:
        assert act_quant_transpose(torch.randn(70, 128), group_sizes=[20, 50], capacity=capacity)[0].shape[1] == 256
        return
    with pytest.raises(KernelArgumentError, match="act_quant_transpose: capacity"):
        act_quant_transpose(torch.randn(70, 128), group_sizes=[20, 50], capacity=capacity)
