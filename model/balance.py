"""Auxiliary-loss-free load balancing across MoE layers: the bias update and the load statistic.

After each optimizer step the trainer (or the pipeline runtime, after all-reducing counts over
ranks) calls `update_router_biases`; it does not reset the counters (`MoE.reset_load` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ExpertLoad:
    """The worst MoE layer's expert load over some tokens: tokens routed to its busiest expert
    (`max_load`) and per expert on average (`mean_load`). 1.0 max/mean is perfect balance."""

    layer: int | None  # row of the counts it came from; None without MoE layers
    max_load: float
    mean_load: float

    @property
    def max_over_mean(self) -> float:
        return self.max_load / self.mean_load if self.mean_load > 0 else 1.0


def worst_layer_load(counts: torch.Tensor) -> ExpertLoad:
    """The one definition of expert-load imbalance: from counts [layers, experts] (tokens routed per
    expert, e.g. summed over a step and over ranks), the layer with the largest max/mean load.

    Both training loops report this (the reference over its whole model, a pipeline rank over its
    layers, then the worst over ranks). A layer that saw no token counts as balanced."""
    if counts.numel() == 0:
        return ExpertLoad(layer=None, max_load=0.0, mean_load=0.0)
    counts = counts.detach().float()
    means = counts.mean(dim=1)  # [layers]
    peaks = counts.max(dim=1).values  # [layers]
    ratios = torch.where(means > 0, peaks / means.clamp_min(1e-30), torch.ones_like(means))
    worst = int(ratios.argmax())
    return ExpertLoad(layer=worst, max_load=float(peaks[worst]), mean_load=float(means[worst]))
