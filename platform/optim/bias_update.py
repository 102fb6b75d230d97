"""Auxiliary-loss-free balancing at the optimizer step: collect expert loads, update router biases.

After every optimizer step each MoE layer's `e_score_correction_bias` moves by
`gamma * sign(mean_load - load)` using the tokens routed to each expert during that step (all of its
micro-batches). The pipeline runtime calls the same two functions, with the counts all-reduced over
the data-parallel (and expert-parallel) group in between, so every replica applies the same update.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from moeforge.model.balance import update_router_biases


def collect_load_counts(moe_modules: Sequence[torch.nn.Module]) -> torch.Tensor:
    """Tokens routed per expert since the last reset, stacked: [n_moe_layers, n_routed_experts] fp32.

    Empty ([0, 0]) for a model (or pipeline stage) without MoE layers."""
    if not moe_modules:
        return torch.zeros(0, 0)
    return torch.stack([m.load_counts.detach().float().clone() for m in moe_modules])


def update_balance(moe_modules: Sequence[torch.nn.Module], gamma: float, counts: torch.Tensor) -> None:
    """Apply the bias update from `counts` ([layers, experts], summed over the whole step and, in a
    distributed run, over ranks) and reset every layer's load counter for the next step.

    gamma = 0 leaves the biases frozen (the counters are still reset)."""
    if not moe_modules:
        return
    # The rule itself (bias += gamma * sign(mean - load), shapes checked) lives with the model.
    update_router_biases(moe_modules, gamma, list(counts))
    for moe in moe_modules:
        moe.reset_load()


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
