"""The optimizer step pieces shared by the reference loop and the pipeline runtime.

- `build_adamw`: the one optimizer constructor, AdamW with two parameter groups. Weight decay
  applies to matrices and stacked expert weights (ndim >= 2: Linear, Embedding, gate and expert weights); it is NOT applied to
  vectors (ndim < 2: RMSNorm scales and biases), whose decay would only pull norms toward zero
  and shift activations without regularising anything (the GPT-2/nanoGPT/V3 convention).
- `grad_sq_sum` / `global_grad_norm` / `clip_grads_with_norm_`: clipping by the global norm is split
  in two so a distributed run can all-reduce the local sum of squares across ranks (pipeline stages,
  dp replicas) and then clip with the same global norm everywhere; the single-process loop just
  takes the square root of its own sum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from moeforge.kernels.adamw_lowp import AdamWLowPrecisionMoments
from moeforge.kernels.weight_cache import invalidate_fp8_weight_cache
from moeforge.platform.config.optim import OptimConfig
from moeforge.platform.config.precision import PrecisionConfig

_MOMENT_DTYPES = {"bfloat16": torch.bfloat16}


def param_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float
) -> list[dict]:
    """Split trainable parameters into a decayed group (ndim >= 2) and a non-decayed one (ndim < 2).

    Order inside each group follows `named_parameters`, so the optimizer state is laid out the same
    on every run with the same model."""
    decay, no_decay = [], []
    for _name, param in named_parameters:
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    # Named: DeepSpeed's MoE group split keys the expert groups it cuts out by the group's name.
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"name": "no_decay", "params": no_decay, "weight_decay": 0.0})
    return groups


def build_adamw(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    optim_cfg: OptimConfig,
    precision_cfg: PrecisionConfig,
    split_groups: Callable[[list[dict]], list[dict]] | None = None,
) -> torch.optim.Optimizer:
    """The one AdamW of every moeforge loop: `param_groups` of `named_parameters` (decay on ndim >= 2
    only), betas / eps / weight decay from `optim_cfg`, moments in precision_cfg.adam_moments_dtype
    (torch's AdamW for float32, AdamWLowPrecisionMoments for bfloat16).

    The reference loop, the plain pipeline step and the ZeRO step (which hands it to DeepSpeed) all
    build their optimizer here. The LR is set before every step with
    `lr_schedule.set_lr(opt, lr_at(step, ...))`; the initial value is the peak LR and never used.
    `split_groups` may re-split the groups (the ZeRO step separates expert parameters with it).
    Every step invalidates the per-step FP8 weight copies
    (`kernels.weight_cache.invalidate_fp8_weight_cache`)."""
    groups = param_groups(named_parameters, optim_cfg.weight_decay)
    if split_groups is not None:
        groups = split_groups(groups)
    if not any(g["params"] for g in groups):
        raise ValueError("build_adamw: no trainable parameters")
    kwargs = {
        "lr": optim_cfg.lr,
        "betas": tuple(optim_cfg.betas),
        "eps": optim_cfg.eps,
        "weight_decay": optim_cfg.weight_decay,
    }
    if precision_cfg.adam_moments_dtype == "float32":
        optimizer = torch.optim.AdamW(groups, **kwargs)
    else:
        moments = _MOMENT_DTYPES[precision_cfg.adam_moments_dtype]
        optimizer = AdamWLowPrecisionMoments(groups, moments_dtype=moments, **kwargs)
    # The FP8 copies of the weights are made once per step: every step makes them stale. DeepSpeed
    # calls this optimizer's step too, so the hook covers the ZeRO path, whose parameter writes
    # (through .data) the cache's version check alone would not see.
    optimizer.register_step_post_hook(lambda _optimizer, _args, _kwargs: invalidate_fp8_weight_cache())
    return optimizer


def _grads(parameters: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad for p in parameters if p.grad is not None]


def grad_sq_sum(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of squared gradient entries (fp32 scalar) over this process's parameters.

    A distributed run all-reduces this (SUM) over every rank that holds distinct parameters before
    taking the square root; replicas holding the same parameters must be counted once."""
    grads = _grads(parameters)
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    return torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()


def global_grad_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all gradients together (fp32 scalar), single-process."""
    return grad_sq_sum(parameters).sqrt()


def clip_grads_with_norm_(
    parameters: Iterable[torch.Tensor], total_norm: torch.Tensor | float, max_norm: float
) -> float:
    """Scale gradients in place by min(1, max_norm / (total_norm + 1e-6)) and return that factor.

    `total_norm` is the already-computed global norm (all ranks together); `max_norm <= 0`
    disables clipping. Same arithmetic as `torch.nn.utils.clip_grad_norm_`, so either can serve as
    the other's reference."""
    if max_norm <= 0:
        return 1.0
    coef = min(1.0, max_norm / (float(total_norm) + 1e-6))
    if coef < 1.0:
        for g in _grads(parameters):
            g.mul_(coef)
    return coef
