"""The expert-load statistic of MoE layers: the worst layer's max/mean load over some tokens.

The router-bias update that the loads drive is moeforge.platform.optim.bias_update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
