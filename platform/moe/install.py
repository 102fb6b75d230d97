"""Applying expert parallelism to a rank's modules: its slice of the experts, then the dispatch.

`shard_experts` runs on the meta-built model, before materialisation, so a rank never allocates
the experts it does not hold (the 256-expert layer of V3 would not fit); `model.init.init_weights` then gives
each held expert the full layer's weights of its global index. `install_dispatch` runs after the
precision policy has swapped the experts module, and replaces each layer's `dispatch`.
"""

from __future__ import annotations

from collections.abc import Sequence

from moeforge.model.moe import RoutedExperts
from moeforge.model.transformer import MoE
from moeforge.platform.moe.dispatch import AllToAllDispatch
from moeforge.platform.moe.expert_placement import ExpertPlacement
from moeforge.platform.moe.routing_stats import RoutingStats


def shard_experts(moe_layers: Sequence[MoE], placement: ExpertPlacement) -> None:
    """Replace each layer's `experts` by a module holding only `placement.local_experts`, on the
    device of the one it replaces (meta when called before materialisation)."""
    for moe in moe_layers:
        full = moe.experts
        if full.n_experts != placement.n_experts:
            raise ValueError(
                f"MoE layer {moe.layer_id}: {full.n_experts} experts, placement is for {placement.n_experts}"
            )
        n_local, inter, dim = placement.experts_per_rank, full.gate_proj.shape[1], full.gate_proj.shape[2]
        local = RoutedExperts(n_local, dim, inter, first_expert=placement.first_local_expert)
        moe.experts = local.to(full.gate_proj.device)


def install_dispatch(
    moe_layers: Sequence[MoE],
    placement: ExpertPlacement,
    group,
    fp8: bool,
    stats: RoutingStats,
    counts_group=None,
) -> None:
    """Route every layer's tokens over `group` (the EP group) with one shared statistics counter.
    `counts_group` (default: `group`), a second group over the same ranks, carries only the count
    exchanges (AllToAllDispatch says why)."""
    for moe in moe_layers:
        if moe.experts.n_experts != placement.experts_per_rank:
            raise ValueError(
                f"MoE layer {moe.layer_id}: holds {moe.experts.n_experts} experts, this EP rank should "
                f"hold {placement.experts_per_rank} (shard_experts first)"
            )
        moe.dispatch = AllToAllDispatch(placement, group, fp8, stats, counts_group=counts_group)
