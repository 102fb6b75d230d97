"""warm_up_kernels: under Triton's CPU interpreter it launches every kernel the FP8 modules' forward
and backward launch (quantizers, weight quantization, fp8_gemm, the grouped GEMMs) and leaves the
modules exactly as they were: parameters, their .grad, the FP8 weight cache, the shared-quantization
memo, the global RNG. On the torch twins it returns at once, launching nothing."""

from __future__ import annotations

import pytest
from moeforge.kernels.fp8_linear import FP8Linear
from moeforge.kernels.warm_up import warm_up_kernels
from moeforge.kernels.wgrad_store import WeightGradStore
from triton_interpreter import run_interpreted

SCRIPT = r"""
import json
import torch
from torch import nn
from moeforge.kernels import shared_quant
from moeforge.kernels.fp8_linear import FP8Linear
from moeforge.kernels.grouped_experts import GroupedSwiGLUExperts
from moeforge.kernels.warm_up import warm_up_kernels
from moeforge.kernels.weight_cache import WEIGHT_CACHE

torch.manual_seed(0)
model = nn.ModuleDict({
    "linear": FP8Linear(96, 64, bias=True),
    "experts": GroupedSwiGLUExperts(3, 128, 64),
    "experts_v3": GroupedSwiGLUExperts(2, 128, 64),
    "mlp": nn.ModuleDict({name: FP8Linear(*shape, bias=False) for name, shape in
                          (("gate_proj", (128, 64)), ("up_proj", (128, 64)), ("down_proj", (64, 128)))}),
})
v3 = model["experts_v3"]
v3.recompute_swiglu, v3.input_scale_fmt, v3.swiglu_scale_fmt = True, "ue8m0", "ue8m0"
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.05)
# A real step first: weight-cache entries, gradients on some parameters (v3's stay None), a memo.
model["linear"](torch.randn(40, 96)).sum().backward()
model["experts"](torch.randn(12, 128), torch.tensor([5, 0, 7])).sum().backward()
model["linear"](torch.randn(8, 96))

def snapshot():
    state = {}
    for name, p in model.named_parameters():
        state[name] = (p.detach().clone(), p._version, None if p.grad is None else (p.grad.clone(), id(p.grad)))
    entries = {key: (e.version, e.epoch, tuple(t.clone() for t in e.value), tuple(id(t) for t in e.value))
               for key, e in WEIGHT_CACHE._entries.items()}
    memo = (shared_quant._source() if shared_quant._source else None, shared_quant._version,
            {k: tuple(id(t) for t in v) for k, v in shared_quant._results.items()}, dict(shared_quant.stats))
    attrs = {name: {k: v for k, v in vars(m).items() if not k.startswith("_")} for name, m in model.named_modules()}
    return state, entries, (WEIGHT_CACHE.epoch, WEIGHT_CACHE.quantizations), memo, attrs, torch.get_rng_state()

def equal(a, b):
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    return a is b or a == b

before = snapshot()
reports = {}
for label, kwargs in (("fp32", dict(compute_dtype=torch.float32)),
                      ("bf16", dict(compute_dtype=torch.bfloat16, recompute_swiglu=True, swiglu_scale_fmt="ue8m0",
                                    fp8_dispatch=True))):
    r = warm_up_kernels([model, model["linear"]], 40, **kwargs)
    reports[label] = {"backend": r.backend, "modules": r.modules, "launches": r.launches, "kernels": r.kernels,
                      "shapes": r.shapes, "seconds": r.seconds, "summary": r.summary()}
after = snapshot()
parts = ("parameters and grads", "weight cache entries", "weight cache counters", "shared quantization memo",
         "module attributes", "rng state")
print(json.dumps({"reports": reports, "unchanged": {p: equal(a, b) for p, a, b in zip(parts, before, after)}}))
"""
KERNELS = {"act_quant", "act_quant_transpose", "weight_quant", "fp8_gemm", "fp8_grouped_gemm",
           "fp8_wgrad_grouped_gemm"}


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_interpreted(["-c", SCRIPT], "warm-up script")


@pytest.mark.parametrize("label", ["fp32", "bf16"])
def test_warm_up_launches_every_kernel_of_the_fp8_modules(interpreted, label):
    report = interpreted["reports"][label]
    assert report["backend"] == "triton" and report["modules"] == 6  # 4 FP8Linear, 2 FP8 expert modules
    assert set(report["kernels"]) == KERNELS
    assert report["launches"] == sum(report["kernels"].values()) and report["seconds"] >= 0
    assert len(report["shapes"]) == len(set(report["shapes"])) and all(
        any(shape.startswith(k + " ") for shape in report["shapes"]) for k in KERNELS)
    assert f"{report['launches']} launches" in report["summary"]


def test_dense_recompute_and_dispatch_add_their_launches(interpreted):
    """bf16 run: dense SwiGLU MLPs under recompute_swiglu add one-group grouped GEMMs, the FP8
    dispatch adds its power-of-two act_quant (compile-time flag UE8M0=True)."""
    fp32, bf16 = interpreted["reports"]["fp32"], interpreted["reports"]["bf16"]
    assert bf16["kernels"]["fp8_grouped_gemm"] > fp32["kernels"]["fp8_grouped_gemm"]
    assert any(s.startswith("act_quant (128, 'torch.bfloat16'") and "'UE8M0': True" in s for s in bf16["shapes"])


@pytest.mark.parametrize("part", ["parameters and grads", "weight cache entries", "weight cache counters",
                                  "shared quantization memo", "module attributes", "rng state"])
def test_warm_up_leaves_the_modules_as_they_were(interpreted, part):
    assert interpreted["unchanged"][part]


def test_on_the_torch_twins_it_returns_at_once(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU tensors: the torch twins
    linear = FP8Linear(96, 64)
    report = warm_up_kernels([linear], 40)
    assert (report.backend, report.modules, report.launches, report.kernels, report.shapes) == ("torch", 1, 0, {}, [])


def test_bad_arguments_and_a_deferring_store_are_refused():
    linear = FP8Linear(96, 64)
    with pytest.raises(ValueError, match="tokens_per_microbatch"):
        warm_up_kernels([linear], 0)
    with WeightGradStore().defer(), pytest.raises(RuntimeError, match="WeightGradStore"):
        warm_up_kernels([linear], 8)
