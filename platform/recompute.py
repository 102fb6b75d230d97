"""Activation recomputation applied from outside the model: what backward recomputes instead of
keeping (DeepSeek-V3, section 3.2.3: "we recompute all RMSNorm operations and MLA up-projections
during back-propagation").

`recompute_mla_up_proj`: every MLA's training path between its input projections and its output
projection (`MLA.attend`: latent norms, q/kv up-projections, rotary, attention) runs under
selective activation checkpointing. The attention core's own outputs (output and log-sum-exp) are
kept; everything else in that stretch is recomputed in backward, so the up-projected queries,
keys and values, the largest tensors of the layer, are never stored. The attention forward itself
is not recomputed when it runs as one fused op (flash / memory-efficient / cuDNN kernels, and
torch's CPU flash kernel); the unfused math fallback would be recomputed, which is slower but
still correct.
"""

from __future__ import annotations

import functools

import torch
from moeforge.model.mla import MLA
from moeforge.platform.instance_override import override_method
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_ATTENTION_OPS = tuple(
    getattr(torch.ops.aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(torch.ops.aten, name)
)


def _keep_attention_core(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _recomputed_attend(module: MLA, *args) -> torch.Tensor:
    context = functools.partial(create_selective_checkpoint_contexts, _keep_attention_core)
    return checkpoint(type(module).attend, module, *args, use_reentrant=False, context_fn=context)


def apply_recompute(model: nn.Module, recompute_mla_up_proj: bool) -> nn.Module:
    """Turn MLA up-projection recomputation on or off for every MLA in `model` (an instance-level
    `attend`: parameters, names and the class are untouched). Idempotent; returns the model."""
    for module in model.modules():
        if isinstance(module, MLA):
            replacement = functools.partial(_recomputed_attend, module) if recompute_mla_up_proj else None
            override_method(module, "attend", replacement)
    return model
