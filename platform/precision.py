"""The precision policy: swap the model's GEMM modules from outside, per `PrecisionConfig`.

    model = apply_precision(build_model(cfg.model), cfg.precision)
    opt = build_adamw(model.named_parameters(), cfg.optim, cfg.precision)  # platform/optim/adamw.py
    with compute_context(cfg.precision, device_type="cuda"):
        loss = model(input_ids, labels=labels).loss
    loss.backward()

What gets swapped (found by the model's HF-compatible names, see notes/model_api.md):
- Linear layers named q_a_proj, q_b_proj, q_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj (attention)
  and gate_proj, up_proj, down_proj (dense MLPs, shared experts): FP8Linear under `fp8`, else
  DeferrableLinear (same numerics as nn.Linear, weight gradient deferrable for zero-bubble W steps).
- Routed experts (any module holding 3-D parameters gate_proj [E, I, D], up_proj, down_proj):
  GroupedSwiGLUExperts, FP8 grouped GEMMs under `fp8`, plain per-expert GEMMs otherwise.
Everything else (embedding, output head, norms, attention core) keeps its module and computes in
`compute_dtype` under autocast (V3 keeps them out of FP8). The MoE router (a child named `gate`)
computes in FP32 even under autocast: its forward runs with autocast off on FP32 inputs, because a
BF16 rounding of the affinities can flip top-k choices. The swapped modules reuse the
original parameter objects: names, shapes and state-dict keys are unchanged, so checkpoints and the
HF loader are unaffected. Parameters are (kept) FP32: they are the master weights; every cast to
BF16 or FP8 happens inside the compute.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from moeforge.kernels.deferrable_linear import DeferrableLinear
from moeforge.kernels.fp8_linear import FP8Linear
from moeforge.kernels.grouped_experts import GroupedSwiGLUExperts
from moeforge.kernels.swappable import SwappableLinear
from moeforge.platform.config.precision import PrecisionConfig
from torch import nn

ATTENTION_PROJECTIONS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
SWAPPED_LINEARS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
FP32_MODULES = ("gate",)  # the MoE router


def is_routed_experts(module: nn.Module) -> bool:
    """A stacked-experts module: gate_proj / up_proj / down_proj are 3-D parameters, not Linears."""
    params = [getattr(module, name, None) for name in MLP_PROJECTIONS]
    return all(isinstance(p, nn.Parameter) and p.dim() == 3 for p in params)


def apply_precision(model: nn.Module, cfg: PrecisionConfig) -> nn.Module:
    """Swap the GEMM modules of `model` in place for `cfg` and return it (parameters made FP32).

    Idempotent; calling it again with another config re-swaps to that config's modules."""
    model.float()  # master weights; a no-op for the FP32 models build_model makes
    linear_cls = FP8Linear if cfg.fp8_linear else DeferrableLinear
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in FP32_MODULES:
                _set_fp32_forward(child, cfg.compute_dtype != "float32")
            elif name in SWAPPED_LINEARS and isinstance(child, nn.Linear):
                if type(child) is not linear_cls:
                    setattr(parent, name, linear_cls.from_linear(child))
            elif is_routed_experts(child) and not isinstance(child, GroupedSwiGLUExperts):
                setattr(parent, name, GroupedSwiGLUExperts.from_experts(child, fp8=cfg.fp8_linear))
            elif isinstance(child, GroupedSwiGLUExperts):
                child.fp8 = cfg.fp8_linear
    return model


def _forward_without_autocast(forward, module: nn.Module, *args, **kwargs):
    device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
    args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    with torch.autocast(device_type, enabled=False):
        return forward(module, *args, **kwargs)


def _set_fp32_forward(module: nn.Module, on: bool) -> None:
    """Make `module` compute in FP32 under autocast (an instance-level forward: parameters, names and
    the class are untouched), or undo it."""
    module.__dict__.pop("forward", None)
    if on:
        module.forward = functools.partial(_forward_without_autocast, type(module).forward, module)


def precision_report(model: nn.Module) -> dict[str, list[str]]:
    """Module names by how they compute: fp8 linears, fp8 experts, deferrable plain linears,
    experts in plain precision, and linears left as they are (head, router, ...)."""
    report: dict[str, list[str]] = {"fp8": [], "fp8_experts": [], "deferrable": [], "experts": [], "unchanged": []}
    for name, module in model.named_modules():
        if isinstance(module, FP8Linear):
            report["fp8"].append(name)
        elif isinstance(module, GroupedSwiGLUExperts):
            report["fp8_experts" if module.fp8 else "experts"].append(name)
        elif isinstance(module, SwappableLinear):
            report["deferrable"].append(name)
        elif isinstance(module, nn.Linear):
            report["unchanged"].append(name)
    return report


def compute_context(cfg: PrecisionConfig, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    """The context the forward (and loss) runs in: BF16 autocast when compute_dtype is bfloat16."""
    if cfg.compute_dtype == "bfloat16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
