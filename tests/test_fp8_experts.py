"""GroupedSwiGLUExperts: the plain path equals a per-expert F.linear loop, the FP8 path equals a
per-expert loop of FP8 linears (the grouped kernels change nothing but the launch count), both
against float64, deferral, and bad counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from moeforge.kernels.fp8_linear import fp8_linear
from moeforge.kernels.grouped_experts import GroupedSwiGLUExperts
from moeforge.kernels.wgrad_store import WeightGradStore

SIZES = [5, 0, 140, 3]  # an empty expert and one spanning two token tiles
DIM, INTER = 96, 64  # neither a multiple of 128: every GEMM pads K or N


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


def make_experts(fp8: bool) -> GroupedSwiGLUExperts:
    torch.manual_seed(0)
    experts = GroupedSwiGLUExperts(len(SIZES), DIM, INTER, fp8=fp8)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return experts


def loop_reference(experts, x, linear=F.linear):
    """Each expert applied to its contiguous slice, one at a time."""
    out = []
    for e, xe in enumerate(torch.split(x, SIZES)):
        h = F.silu(linear(xe, experts.gate_proj[e])) * linear(xe, experts.up_proj[e])
        out.append(linear(h, experts.down_proj[e]))
    return torch.cat(out)


def forward_backward(fn, params, x, grad):
    x = x.detach().requires_grad_()
    for p in params:
        p.grad = None
    y = fn(x)
    y.backward(grad)
    return [y.detach(), x.grad] + [p.grad.clone() for p in params]


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(sum(SIZES), DIM, generator=gen), torch.randn(sum(SIZES), DIM, generator=gen)


def test_plain_grouped_experts_equal_the_per_expert_loop(data):
    experts = make_experts(fp8=False)
    params, counts = list(experts.parameters()), torch.tensor(SIZES)
    got = forward_backward(lambda x: experts(x, counts), params, *data)
    want = forward_backward(lambda x: loop_reference(experts, x), params, *data)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_fp8_grouped_experts_equal_a_loop_of_fp8_linears(data):
    experts = make_experts(fp8=True)
    params, counts = list(experts.parameters()), torch.tensor(SIZES)
    got = forward_backward(lambda x: experts(x, counts), params, *data)
    want = forward_backward(lambda x: loop_reference(experts, x, fp8_linear), params, *data)
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) < 1e-5
    assert torch.equal(got[3][1], torch.zeros_like(got[3][1]))  # expert 1 saw no tokens


def test_fp8_grouped_experts_against_float64(data):
    experts = make_experts(fp8=True)
    params, counts = list(experts.parameters()), torch.tensor(SIZES)
    got = forward_backward(lambda x: experts(x, counts), params, *data)
    ref64 = make_experts(fp8=False).double()
    want = forward_backward(lambda x: ref64(x, counts), list(ref64.parameters()), data[0].double(), data[1].double())
    errors = [rel_err(a, b) for a, b in zip(got, want, strict=True)]
    print("\nFP8 experts (3 chained GEMMs) relative errors vs float64 [y, dx, d_gate, d_up, d_down]: "
          + ", ".join(f"{e:.3e}" for e in errors))
    assert all(e < 0.1 for e in errors)


@pytest.mark.parametrize("fp8", [False, True])
def test_deferred_expert_gradients_equal_immediate(data, fp8):
    experts = make_experts(fp8=fp8)
    params, counts = list(experts.parameters()), torch.tensor(SIZES)
    immediate = forward_backward(lambda x: experts(x, counts), params, *data)
    store = WeightGradStore()
    with store.defer():
        x = data[0].detach().requires_grad_()
        for p in params:
            p.grad = None
        experts(x, counts).backward(data[1])
    assert all(p.grad is None for p in params)
    assert torch.equal(x.grad, immediate[1])
    assert store.flush() == 3
    for p, want in zip(params, immediate[2:], strict=True):
        assert torch.equal(p.grad, want)


def test_bad_tokens_per_expert_is_refused(data):
    experts = make_experts(fp8=True)
    with pytest.raises(ValueError, match="tokens_per_expert"):
        experts(data[0], torch.tensor([1, 2, 3, 4]))
