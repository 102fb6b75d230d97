"""FP8Linear and DeferrableLinear: gradients against float64, the wiring against the kernels,
deferred == immediate weight gradients, saved-activation memory, autocast dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from moeforge.kernels.deferrable_linear import DeferrableLinear
from moeforge.kernels.fp8_linear import FP8Linear
from moeforge.kernels.gemm import fp8_gemm
from moeforge.kernels.quant import act_quant, weight_quant
from moeforge.kernels.wgrad_store import WeightGradStore
from moeforge.platform.bench.twin_check import irregular
from torch import nn


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


def make_linear(k: int, n: int, bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        if bias:
            lin.bias.normal_(0, 0.05)
    return lin


def run(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    x = x.detach().requires_grad_()
    for p in module.parameters():
        p.grad = None
    y = module(x)
    y.backward(grad)
    return y.detach(), x.grad, [p.grad for p in module.parameters()]


@pytest.mark.parametrize("k, n, bias", [(256, 384, False), (96, 200, True)])  # aligned; padded K and N
def test_fp8_linear_forward_and_gradients_against_float64(k, n, bias):
    lin = make_linear(k, n, bias)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 50, k, generator=gen)
    grad = torch.randn(3, 50, n, generator=gen)
    y, dx, grads = run(FP8Linear.from_linear(lin), x, grad)
    y64, dx64, grads64 = run(_float64(lin), x.double(), grad.double())
    errors = {"y": rel_err(y, y64), "dx": rel_err(dx, dx64), "dw": rel_err(grads[0], grads64[0])}
    print(f"\nFP8Linear K={k} N={n} relative errors vs float64: " + ", ".join(f"{a}={e:.3e}" for a, e in errors.items()))
    assert all(1e-4 < e <= 5e-2 for e in errors.values()), errors  # quantized, but within the goal
    if bias:
        assert rel_err(grads[1], grads64[1]) < 1e-6  # bias gradient stays in high precision
    assert dx.dtype == torch.float32 and grads[0].dtype == torch.float32


def _float64(lin: nn.Linear) -> nn.Linear:
    ref = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, dtype=torch.float64)
    ref.load_state_dict({k: v.double() for k, v in lin.state_dict().items()})
    return ref


def test_fp8_linear_forward_is_exactly_the_kernels_on_zero_padded_operands():
    lin = make_linear(96, 200, False)
    x = irregular((7, 96), torch.Generator().manual_seed(2), "cpu")
    want = fp8_gemm(*act_quant(F.pad(x, (0, 32))), *weight_quant(F.pad(lin.weight, (0, 32))), out_dtype=torch.float32)
    assert torch.equal(FP8Linear.from_linear(lin)(x), want)


@pytest.mark.parametrize("cls", [FP8Linear, DeferrableLinear])
def test_deferred_weight_gradients_equal_immediate_ones(cls):
    lin = make_linear(160, 130, True)
    module = cls.from_linear(lin)
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 70, 160, generator=gen) for _ in range(2)]
    grads = [torch.randn(2, 70, 130, generator=gen) for _ in range(2)]
    immediate = []
    for x, g in zip(xs, grads, strict=True):
        immediate.append(run(module, x, g))

    store = WeightGradStore()
    deferred_dx = []
    for x, g in zip(xs, grads, strict=True):  # two B steps, then two W steps
        with store.defer():
            _, dx, (dw, db) = run(module, x, g)
        assert dw is None and db is not None  # weight gradient queued, bias computed in B
        deferred_dx.append(dx)
    assert len(store) == 2
    for i, (_, dx_now, (dw_now, _)) in enumerate(immediate):
        lin.weight.grad = None
        assert store.pop() == 1
        assert torch.equal(lin.weight.grad, dw_now)
        assert torch.equal(deferred_dx[i], dx_now)
    with pytest.raises(RuntimeError, match="nothing queued"):
        store.pop()


def test_deferred_gradients_accumulate_like_autograd():
    lin = make_linear(128, 128, False)
    module = DeferrableLinear.from_linear(lin)
    x, g = torch.randn(4, 128), torch.randn(4, 128)
    module(x).backward(g)
    module(x).backward(g)
    twice = lin.weight.grad.clone()
    lin.weight.grad = None
    store = WeightGradStore()
    with store.defer():
        module(x).backward(g)
        module(x).backward(g)
    assert store.flush() == 2
    torch.testing.assert_close(lin.weight.grad, twice, rtol=0, atol=1e-6)


def test_store_blocks_do_not_nest():
    a, b = WeightGradStore(), WeightGradStore()
    with a.defer(), pytest.raises(RuntimeError, match="already collecting"), b.defer():
        pass


def test_deferrable_linear_is_nn_linear_numerics():
    lin = make_linear(96, 72, True)
    x, g = torch.randn(5, 96), torch.randn(5, 72)
    want = run(lin, x, g)
    got = run(DeferrableLinear.from_linear(lin), x, g)
    assert torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1], rtol=1e-6, atol=1e-7)
    for a, b in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = lin(x)
        y = DeferrableLinear.from_linear(lin)(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16 and torch.equal(y, y_ref)


def test_fp8_linear_under_bf16_autocast():
    lin = make_linear(128, 256, False)
    x = torch.randn(4, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = FP8Linear.from_linear(lin)(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and lin.weight.grad.dtype == torch.float32
    assert torch.isfinite(lin.weight.grad).all() and lin.weight.grad.abs().sum() > 0


def saved_bytes(module: nn.Module, inp: torch.Tensor) -> int:
    """Bytes that autograd keeps for backward, parameters excluded (they exist anyway)."""
    params = {p.data_ptr() for p in module.parameters()}
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(inp.detach().requires_grad_())
    return total


def test_saved_activations_take_about_half_of_bf16():
    lin = make_linear(512, 512, False)
    x = torch.randn(8, 128, 512)
    bf16 = saved_bytes(make_linear(512, 512, False).to(torch.bfloat16), x.to(torch.bfloat16))
    fp8 = saved_bytes(FP8Linear.from_linear(lin), x.to(torch.bfloat16))
    assert bf16 == x.numel() * 2
    ratio = fp8 / bf16
    print(f"\nsaved activation bytes FP8/BF16 = {ratio:.4f}")
    assert 0.5 < ratio < 0.52  # e4m3 bytes + one FP32 scale per 128 values


def test_swapped_modules_keep_parameters_names_and_class():
    lin = make_linear(64, 32, True)
    for cls in (FP8Linear, DeferrableLinear):
        module = cls.from_linear(lin)
        assert isinstance(module, nn.Linear)
        assert module.weight is lin.weight and module.bias is lin.bias
        assert list(module.state_dict()) == list(lin.state_dict())


def test_frozen_weight_gets_no_gradient_and_keeps_no_activation():
    lin = make_linear(128, 64, False)
    lin.weight.requires_grad_(False)
    module = FP8Linear.from_linear(lin)
    assert saved_bytes(module, torch.randn(4, 128)) == 0
    x = torch.randn(4, 128, requires_grad=True)
    module(x).sum().backward()
    assert x.grad is not None and lin.weight.grad is None
