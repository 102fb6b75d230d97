"""Compile and autotune every Triton kernel a training step will launch, before the step.

Triton compiles a kernel on its first launch and autotunes it on the first launch of each new key,
seconds each. Inside step 1 that time counts against the peers' collective timeouts. So every rank
calls, before step 1 and then a barrier:

    report = warm_up_kernels([model_chunk, ...], tokens_per_microbatch, compute_dtype=torch.bfloat16)

It walks the given modules for the kernels' own module types (FP8Linear; GroupedSwiGLUExperts with
fp8; optionally dense SwiGLU MLPs under recompute_swiglu and the FP8 dispatch payload, which the
modules cannot show) and runs, once per distinct shape, the same autograd functions their forward
and backward run, on stand-ins: random inputs of the step's shapes (a private generator, so the
global RNG is not advanced) and detached views of the parameters, so the weights are read, never
written, and no .grad of a parameter is touched. The FP8 weight cache and the shared-quantization
memo are bypassed. The autotuning keys do not depend on routed row counts (`triton_launch.TritonKernel`), so
tuning on these stand-ins serves every later call of the same shapes. With the torch twins (CPU
without TRITON_INTERPRET) it returns at once.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from moeforge.kernels.backend import use_triton
from moeforge.kernels.fp8_format import BLOCK
from moeforge.kernels.fp8_linear import FP8Linear, fp8_linear
from moeforge.kernels.grouped_experts import GroupedSwiGLUExperts, recomputed_swiglu_mlp, swiglu_experts
from moeforge.kernels.shared_quant import isolated
from moeforge.kernels.token_compress import compress_tokens
from moeforge.kernels.weight_cache import WEIGHT_CACHE
from moeforge.kernels.wgrad_store import active_store
from torch import nn

SWIGLU_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # recomputed_swiglu_mlp's arguments


@dataclass
class WarmUpReport:
    """What warm_up_kernels launched: per kernel, the launches; the distinct (autotuning key,
    compile-time flags) pairs, each a compiled and tuned variant; the wall time including the
    device's work."""

    backend: str  # "triton", or "torch" (twins: nothing to compile, nothing launched)
    modules: int = 0  # FP8Linear and FP8 expert modules found (each distinct shape is run once)
    launches: int = 0
    kernels: dict[str, int] = field(default_factory=dict)  # kernel -> launches
    shapes: list[str] = field(default_factory=list)  # "kernel key flags": each a compiled variant
    seconds: float = 0.0

    def summary(self) -> str:
        """One log line."""
        per_kernel = ", ".join(f"{name} x{n}" for name, n in sorted(self.kernels.items())) or "none"
        return (f"kernel warm-up ({self.backend}): {self.modules} modules, {self.launches} launches, "
                f"{len(self.shapes)} shapes in {self.seconds:.1f} s ({per_kernel})")


def _stand_in(p: torch.Tensor | None) -> torch.Tensor | None:
    """A leaf sharing p's storage, read-only here: gradients computed for it stay on it."""
    return None if p is None else p.detach().requires_grad_(p.requires_grad)


def _linear_shell(linear: FP8Linear) -> FP8Linear:
    """An FP8Linear around stand-ins of `linear`'s parameters (recomputed_swiglu_mlp calls modules)."""
    shell = FP8Linear.__new__(FP8Linear)
    nn.Module.__init__(shell)
    shell.in_features, shell.out_features = linear.in_features, linear.out_features
    shell.weight = nn.Parameter(linear.weight.detach(), requires_grad=linear.weight.requires_grad)
    shell.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=linear.bias.requires_grad)
    shell.input_scale_fmt = linear.input_scale_fmt
    return shell


def _swiglu_triple(module: nn.Module) -> tuple[FP8Linear, ...] | None:
    linears = tuple(getattr(module, name, None) for name in SWIGLU_PROJECTIONS)
    return linears if all(isinstance(m, FP8Linear) for m in linears) else None


class _Runner:
    def __init__(self, tokens: int, dtype: torch.dtype) -> None:
        self.tokens, self.dtype = tokens, dtype
        self.generators: dict[torch.device, torch.Generator] = {}

    def randn(self, *shape: int, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        gen = self.generators.setdefault(device, torch.Generator(device=device).manual_seed(0))
        return torch.randn(shape, generator=gen, device=device).to(dtype or self.dtype)

    # Each returns the forward's output, whose backward runs after autocast is left, as in a step.
    def linear(self, m: FP8Linear) -> torch.Tensor:
        x = self.randn(self.tokens, m.in_features, device=m.weight.device).requires_grad_()
        return fp8_linear(x, _stand_in(m.weight), _stand_in(m.bias), m.input_scale_fmt)

    def experts(self, m: GroupedSwiGLUExperts) -> torch.Tensor:
        n_experts, _, dim = m.gate_proj.shape
        device = m.gate_proj.device
        counts = torch.full((n_experts,), self.tokens // n_experts, dtype=torch.int64, device=device)
        counts[: self.tokens % n_experts] += 1  # [E], summing to the tokens (on the device)
        x = self.randn(self.tokens, dim, device=device).requires_grad_()  # [T, D]
        row_weights = self.randn(self.tokens, device=device, dtype=torch.float32).requires_grad_()  # [T]
        return swiglu_experts(
            x, counts, row_weights, *(_stand_in(p) for p in (m.gate_proj, m.up_proj, m.down_proj)), fp8=True,
            recompute_swiglu=m.recompute_swiglu, input_scale_fmt=m.input_scale_fmt,
            swiglu_scale_fmt=m.swiglu_scale_fmt,
        )

    def dense_swiglu(self, triple: tuple[FP8Linear, ...], scale_fmt: str | None) -> torch.Tensor:
        gate, up, down = (_linear_shell(m) for m in triple)
        x = self.randn(self.tokens, gate.in_features, device=gate.weight.device).requires_grad_()
        return recomputed_swiglu_mlp(x, gate, up, down, True, scale_fmt)

    def dispatch(self, dim: int, device: torch.device) -> None:
        compress_tokens(self.randn(self.tokens, dim, device=device))  # forward only


def warm_up_kernels(
    modules: Iterable[nn.Module],
    tokens_per_microbatch: int,
    *,
    compute_dtype: torch.dtype = torch.bfloat16,
    recompute_swiglu: bool = False,
    swiglu_scale_fmt: str | None = None,
    fp8_dispatch: bool = False,
) -> WarmUpReport:
    """Launch every Triton kernel the forward and backward of `modules` would launch, once per
    distinct shape, on stand-ins (see the module docstring); return what was launched.

    tokens_per_microbatch: rows of a micro-batch (batch x sequence); the FP8Linear GEMMs' row class
    and weight-gradient width depend on it. compute_dtype: the activations' dtype in the step
    (autocast is on when it is not float32). recompute_swiglu / swiglu_scale_fmt: the precision
    policy's settings for dense SwiGLU MLPs (modules with FP8Linear gate_proj, up_proj, down_proj),
    whose down projection then runs as a one-group grouped GEMM. fp8_dispatch: also the FP8
    compression of the MoE dispatch payload, for each expert module's hidden size."""
    if isinstance(tokens_per_microbatch, bool) or not isinstance(tokens_per_microbatch, int) or tokens_per_microbatch < 1:
        raise ValueError(f"tokens_per_microbatch: must be a positive integer, got {tokens_per_microbatch!r}")
    if active_store() is not None:
        raise RuntimeError("warm_up_kernels: a WeightGradStore is deferring gradients; call it outside defer()")
    jobs: dict[tuple, tuple] = {}  # distinct shape (device third) -> (runner method, arguments)
    seen: set[int] = set()
    found = 0
    for root in modules:
        for m in root.modules():
            if id(m) in seen:
                continue
            seen.add(id(m))
            found += isinstance(m, FP8Linear) or (isinstance(m, GroupedSwiGLUExperts) and m.fp8)
            if isinstance(m, FP8Linear):
                w = m.weight
                key = ("linear", tuple(w.shape), w.device, m.bias is not None, m.input_scale_fmt, w.requires_grad)
                jobs.setdefault(key, ("linear", (m,)))
            elif isinstance(m, GroupedSwiGLUExperts) and m.fp8:
                w = m.gate_proj
                key = ("experts", tuple(w.shape), w.device, m.recompute_swiglu, m.input_scale_fmt,
                       m.swiglu_scale_fmt, w.requires_grad)
                jobs.setdefault(key, ("experts", (m,)))
                if fp8_dispatch and w.shape[-1] % BLOCK == 0:  # the payload needs whole 128-wide tiles
                    jobs.setdefault(("dispatch", w.shape[-1], w.device), ("dispatch", (w.shape[-1], w.device)))
            triple = _swiglu_triple(m)
            if recompute_swiglu and triple is not None:
                shapes = tuple((tuple(t.weight.shape), t.weight.requires_grad) for t in triple)
                key = ("dense_swiglu", shapes, triple[0].weight.device, swiglu_scale_fmt)
                jobs.setdefault(key, ("dense_swiglu", (triple, swiglu_scale_fmt)))
    on_triton = {key: job for key, job in jobs.items() if use_triton(torch.empty(0, device=key[2]))}
    if not on_triton:
        return WarmUpReport(backend="torch", modules=found)
    from moeforge.kernels.triton_launch import record_launches  # Triton is usable here

    runner = _Runner(tokens_per_microbatch, compute_dtype)
    devices = {key[2] for key in on_triton}
    start = time.perf_counter()
    with record_launches() as records, WEIGHT_CACHE.bypassed(), isolated(), torch.enable_grad():
        for key, (method, args) in on_triton.items():
            device = key[2]
            with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
                y = getattr(runner, method)(*args)
            if y is not None:
                y.backward(runner.randn(*y.shape, device=device, dtype=y.dtype))
        for device in devices:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the seconds include the device's work
    seconds = time.perf_counter() - start
    shapes = sorted({f"{r.kernel} {r.key} {dict(r.flags)}" for r in records})
    return WarmUpReport(backend="triton", modules=found, launches=len(records),
                        kernels=dict(Counter(r.kernel for r in records)), shapes=shapes, seconds=seconds)
