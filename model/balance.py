"""Auxiliary-loss-free load balancing across MoE layers: the bias update and load statistics.

After each optimizer step the trainer (or the pipeline runtime, after all-reducing counts over
ranks) calls `update_router_biases`; it does not reset the counters (`MoE.reset_load` does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from moeforge.model.moe import MoE


def update_router_biases(
    moe_modules: Sequence[MoE], gamma: float, counts_list: Sequence[torch.Tensor] | None = None
) -> None:
    """bias += gamma * sign(mean_load - load) per layer, from `counts_list` (one [E] tensor per
    module, in the same order) or, when None, from each module's own `load_counts`."""
    if counts_list is not None and len(counts_list) != len(moe_modules):
        raise ValueError(f"counts_list has {len(counts_list)} entries for {len(moe_modules)} MoE layers")
    for i, moe in enumerate(moe_modules):
        counts = moe.load_counts if counts_list is None else counts_list[i]
        if counts.shape != (moe.n_experts,):
            raise ValueError(
                f"counts for MoE layer {moe.layer_id}: shape {tuple(counts.shape)}, want ({moe.n_experts},)"
            )
        moe.update_bias(counts, gamma)


def load_stats(moe_modules: Sequence[MoE]) -> dict[str, float]:
    """Per-layer expert load from the current counters: `moe/L{id}/max_load`, `.../mean_load`,
    `.../max_over_mean` (1.0 = perfectly balanced), and `moe/max_over_mean` (worst layer)."""
    stats: dict[str, float] = {}
    worst = 1.0
    for moe in moe_modules:
        counts = moe.load_counts.float()
        mean = float(counts.mean())
        peak = float(counts.max())
        ratio = peak / mean if mean > 0 else 1.0
        worst = max(worst, ratio)
        stats[f"moe/L{moe.layer_id}/max_load"] = peak
        stats[f"moe/L{moe.layer_id}/mean_load"] = mean
        stats[f"moe/L{moe.layer_id}/max_over_mean"] = ratio
    if moe_modules:
        stats["moe/max_over_mean"] = worst
    return stats
