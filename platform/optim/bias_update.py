"""Auxiliary-loss-free balancing at the optimizer step (DeepSeek-V3's router-bias update).

After every optimizer step each MoE layer's `e_score_correction_bias` moves by
`gamma * sign(mean_load - load)`, from the tokens routed to each expert during that step (all of its
micro-batches). Both training loops call `update_router_biases`; a pipeline rank passes an
all-reduce over the ranks holding the same layers, so every copy of a layer applies the same update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def update_router_biases(
    moe_modules: Sequence[torch.nn.Module],
    gamma: float,
    reduce_counts: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Move every layer's router bias by gamma * sign(mean load - load) (overloaded experts go down)
    and reset the layers' load counters; return the step's counts [layers, experts] fp32 (empty
    [0, 0] without MoE layers), summed in place by `reduce_counts` first when given.

    gamma = 0 leaves the biases frozen (the counters are still reset)."""
    if not moe_modules:
        return torch.zeros(0, 0)
    for moe in moe_modules:
        if moe.load_counts.shape != (moe.n_experts,):
            raise ValueError(
                f"load counts of MoE layer {moe.layer_id}: shape {tuple(moe.load_counts.shape)}, "
                f"want ({moe.n_experts},)"
            )
    counts = torch.stack([m.load_counts.detach().float().clone() for m in moe_modules])  # [layers, experts]
    if reduce_counts is not None:
        reduce_counts(counts)
    with torch.no_grad():
        for moe, layer_counts in zip(moe_modules, counts, strict=True):
            bias = moe.gate.e_score_correction_bias
            layer_counts = layer_counts.to(bias.device, torch.float32)
            bias += gamma * torch.sign(layer_counts.mean() - layer_counts)
            moe.reset_load()
    return counts


def set_balance_loss_scale(moe_modules: Sequence[torch.nn.Module], alpha: float, scale: float) -> None:
    """Weight each micro-batch's sequence-wise balance loss by `scale` (1/M for M micro-batches).

    The MoE layers attach alpha * balance_loss to their output with an identity autograd function
    whose backward injects it with unit weight, so it does NOT see the 1/M the loop puts on each
    micro-batch's LM loss: M micro-batches would then carry M times the full batch's balance
    gradient, and the number of micro-batches would change the math. Scaling alpha by 1/M makes the
    accumulated gradient alpha * mean over micro-batches = the full batch's (mean over sequences).
    The layers' recorded `last_aux_loss` then includes the 1/M factor."""
    for moe in moe_modules:
        if not hasattr(moe, "aux_alpha"):
            raise AttributeError(f"{type(moe).__name__} has no aux_alpha: cannot scale its balance loss")
        moe.aux_alpha = alpha * scale
