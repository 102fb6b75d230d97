"""The precision policy: swap the model's GEMM modules from outside, per `PrecisionConfig`.

    model = apply_precision(build_model(cfg.model), cfg.precision)
    opt = build_adamw(model.named_parameters(), cfg.optim, cfg.precision)  # platform.optim.adamw
    with compute_context(cfg.precision, device_type="cuda"):
        loss = model(input_ids, labels=labels).loss
    loss.backward()

What gets swapped (found by the model's HF-compatible names, those of `model.mla.MLA`,
`model.moe.MLP` and `model.moe.RoutedExperts`):
- Linear layers named q_a_proj, q_b_proj, q_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj (attention)
  and gate_proj, up_proj, down_proj (dense MLPs, shared experts): FP8Linear under `fp8`, else
  DeferrableLinear (same numerics as nn.Linear, weight gradient deferrable for zero-bubble W steps).
- Routed experts (any module holding 3-D parameters gate_proj [E, I, D], up_proj, down_proj):
  GroupedSwiGLUExperts, FP8 grouped GEMMs under `fp8`, plain per-expert GEMMs otherwise.
Everything else (embedding, output head, norms, attention core) keeps its module and computes in
`compute_dtype` under autocast (V3 keeps them out of FP8). The embedding's output is cast to the
compute dtype (autocast leaves embedding lookups in the table's FP32), so the residual stream, the
norms' outputs and the MoE combine are BF16 under bf16 and fp8, as V3 keeps them.
V3's storage options: `recompute_swiglu` makes the routed experts keep only the SwiGLU inputs
(FP8 under fp8) and recompute its output in backward; `power_of_two_scales` gives ue8m0 scales to
the FP8 tiles of the attention output projection's input, the SwiGLU inputs and the routed
experts' input rows (whose FP8 copy changes tile orientation in backward). `recompute_mla_up_proj`
recomputes MLA's latent norms and up-projections in backward (`platform.recompute.apply_recompute`). The
MoE router (a child named `gate`) computes in FP32 even under autocast: its forward runs with autocast
off and casts to FP32 itself, because a BF16 rounding of the affinities can flip top-k choices. The
swapped modules reuse the original parameter objects: names, shapes and state-dict keys are unchanged,
so checkpoints and the HF loader are unaffected. Parameters are (kept) FP32: they are the master
weights; every cast to BF16 or FP8 happens inside the compute.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from moeforge.kernels.deferrable_linear import DeferrableLinear
from moeforge.kernels.fp8_linear import FP8Linear
from moeforge.kernels.grouped_experts import GroupedSwiGLUExperts, recomputed_swiglu_mlp
from moeforge.kernels.swappable import SwappableLinear
from moeforge.kernels.warm_up import WarmUpReport, warm_up_kernels
from moeforge.platform.config.precision import PrecisionConfig
from moeforge.platform.instance_override import override_method
from moeforge.platform.recompute import apply_recompute
from torch import nn

ATTENTION_PROJECTIONS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
SWAPPED_LINEARS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
FP32_MODULES = ("gate",)  # the MoE router
POW2_INPUT_LINEARS = ("o_proj",)  # FP8 inputs with power-of-two scales under power_of_two_scales


def is_routed_experts(module: nn.Module) -> bool:
    """A stacked-experts module: gate_proj / up_proj / down_proj are 3-D parameters, not Linears."""
    params = [getattr(module, name, None) for name in MLP_PROJECTIONS]
    return all(isinstance(p, nn.Parameter) and p.dim() == 3 for p in params)


def is_swiglu_mlp(module: nn.Module) -> bool:
    """A dense SwiGLU MLP (dense blocks, shared experts): gate_proj / up_proj / down_proj Linears."""
    return all(isinstance(getattr(module, name, None), nn.Linear) for name in MLP_PROJECTIONS)


def apply_precision(model: nn.Module, cfg: PrecisionConfig) -> nn.Module:
    """Swap the GEMM modules of `model` in place for `cfg` and return it (parameters made FP32).

    Idempotent; calling it again with another config re-swaps to that config's modules."""
    model.float()  # master weights; a no-op for the FP32 models build_model makes
    linear_cls = FP8Linear if cfg.fp8_linear else DeferrableLinear
    pow2 = "ue8m0" if cfg.power_of_two_scales else None
    low_precision = cfg.compute_dtype != "float32"
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in FP32_MODULES:
                _set_fp32_forward(child, low_precision)
            elif isinstance(child, nn.Embedding):
                _set_output_dtype(child, getattr(torch, cfg.compute_dtype) if low_precision else None)
            elif name in SWAPPED_LINEARS and isinstance(child, nn.Linear):
                if type(child) is not linear_cls:
                    child = linear_cls.from_linear(child)
                    setattr(parent, name, child)
                if isinstance(child, FP8Linear):
                    child.input_scale_fmt = pow2 if name in POW2_INPUT_LINEARS else None
            elif is_swiglu_mlp(child):
                _set_recomputed_swiglu(child, cfg.recompute_swiglu, cfg.fp8_linear, pow2)
            elif is_routed_experts(child):
                if not isinstance(child, GroupedSwiGLUExperts):
                    child = GroupedSwiGLUExperts.from_experts(child, fp8=cfg.fp8_linear)
                    setattr(parent, name, child)
                child.fp8, child.recompute_swiglu = cfg.fp8_linear, cfg.recompute_swiglu
                child.input_scale_fmt = child.swiglu_scale_fmt = pow2
    return apply_recompute(model, cfg.recompute_mla_up_proj)


def _recomputed_swiglu_forward(module: nn.Module, fp8: bool, scale_fmt: str | None, x: torch.Tensor) -> torch.Tensor:
    return recomputed_swiglu_mlp(x, module.gate_proj, module.up_proj, module.down_proj, fp8, scale_fmt)


def _set_recomputed_swiglu(module: nn.Module, on: bool, fp8: bool, scale_fmt: str | None) -> None:
    """Make a dense SwiGLU MLP recompute its SwiGLU output in backward (an instance-level forward;
    its Linears stay, and are swapped like any other), or undo it."""
    replacement = functools.partial(_recomputed_swiglu_forward, module, fp8, scale_fmt) if on else None
    override_method(module, "forward", replacement)


def _forward_in_dtype(forward, dtype: torch.dtype, module: nn.Module, *args, **kwargs):
    out = forward(module, *args, **kwargs)
    return out.to(dtype) if torch.is_autocast_enabled(out.device.type) else out


def _set_output_dtype(module: nn.Module, dtype: torch.dtype | None) -> None:
    """Cast `module`'s output to `dtype` while autocast is on (None: undo), as an instance-level
    forward: parameters, names and the class are untouched."""
    replacement = None if dtype is None else functools.partial(_forward_in_dtype, type(module).forward, dtype, module)
    override_method(module, "forward", replacement)


def _forward_without_autocast(forward, module: nn.Module, *args, **kwargs):
    # Inputs keep their dtype: the router casts to FP32 inside its own arithmetic, and keeps its
    # BF16 input (not an FP32 copy) for backward.
    device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
    with torch.autocast(device_type, enabled=False):
        return forward(module, *args, **kwargs)


def _set_fp32_forward(module: nn.Module, on: bool) -> None:
    """Make `module` compute in FP32 under autocast (an instance-level forward: parameters, names and
    the class are untouched), or undo it."""
    replacement = functools.partial(_forward_without_autocast, type(module).forward, module) if on else None
    override_method(module, "forward", replacement)


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


def warm_up_fp8_kernels(
    module: nn.Module, cfg: PrecisionConfig, tokens_per_microbatch: int, fp8_dispatch: bool = False
) -> WarmUpReport:
    """Compile and tune, before the first step, every Triton kernel `module`'s swapped GEMMs will
    launch, with this policy's settings (`kernels.warm_up.warm_up_kernels`); nothing is launched on the
    torch twins. `fp8_dispatch`: the MoE layers send their tokens as FP8 (expert parallelism under
    fp8)."""
    return warm_up_kernels(
        [module],
        tokens_per_microbatch,
        compute_dtype=getattr(torch, cfg.compute_dtype),
        recompute_swiglu=cfg.recompute_swiglu,
        swiglu_scale_fmt="ue8m0" if cfg.power_of_two_scales else None,
        fp8_dispatch=fp8_dispatch,
    )
