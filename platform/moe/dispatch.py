"""AllToAllDispatch: the routed part of an MoE layer when its experts are spread over an EP group.

Per layer call, on every EP rank at once (collective over the group):

    1. destinations   each token's top-k experts -> the EP ranks holding them; the unique (token,
                      rank) pairs, ordered by rank then token. A token whose k experts share a rank
                      is sent to it ONCE (as V3 sends a token to a node once), with the routing of
                      all its experts there.
    2. counts         pairs per destination exchanged first: splits are uneven (dropless routing,
                      no capacity factor, no token ever dropped)
    3. dispatch       the pairs' hidden vectors: FP8 e4m3 + 1x128 scales under precision=fp8,
                      otherwise the compute dtype; beside them, per pair, its k gate weights and
                      local expert ids (weight 0 / id -1 for experts on other ranks), in fp32
    4. experts        received (pair, slot) rows sorted by local expert, one grouped-GEMM call
                      (the experts module precision installed), gated by their weights, summed
                      per pair: one partial output per received pair
    5. combine        partial outputs back to their senders in the compute dtype, summed per token

Backward runs the reverse all-to-alls inside autograd (platform/moe/all_to_all.py); gradients
travel in the compute dtype. The gate weights travel with autograd too, so the router receives the
same gradient as on one device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moeforge.kernels.compute_dtype import compute_dtype
from moeforge.model.moe import sum_rows_by_index
from moeforge.platform.moe.all_to_all import all_to_all_rows, dispatch_rows_fp8, exchange_counts
from moeforge.platform.moe.placement import ExpertPlacement
from moeforge.platform.moe.routing_stats import RoutingStats
from torch import nn


@dataclass
class DispatchPlan:
    """Where one layer call's tokens go: the unique (token, EP rank) pairs, rank-major."""

    send_mask: torch.Tensor  # [N, ep] bool: token n has at least one expert on rank r
    pair_rank: torch.Tensor  # [P] destination of each pair
    pair_token: torch.Tensor  # [P] token of each pair
    send_counts: torch.Tensor  # [ep] pairs per destination


def plan_dispatch(expert_ids: torch.Tensor, placement: ExpertPlacement) -> DispatchPlan:
    """Step 1 of the dispatch (also what `moeforge-bench ep` sends): expert_ids [N, k] -> the pairs."""
    n_tokens = expert_ids.shape[0]
    dest = placement.rank_of_expert(expert_ids)  # [N, k]
    send_mask = torch.zeros(n_tokens, placement.ep, dtype=torch.bool, device=expert_ids.device)
    send_mask.scatter_(1, dest, True)
    pair_rank, pair_token = send_mask.t().nonzero(as_tuple=True)  # [P], [P]
    return DispatchPlan(send_mask, pair_rank, pair_token, send_mask.sum(dim=0))


def pair_routing(
    plan: DispatchPlan, weights: torch.Tensor, expert_ids: torch.Tensor, placement: ExpertPlacement
) -> torch.Tensor:
    """Per pair, its token's k gate weights and local expert ids on the destination (weight 0 and
    id -1 for experts on other ranks), fp32 -> [P, 2k]: what travels beside the hidden rows."""
    ids = expert_ids[plan.pair_token]  # [P, k]
    on_dest = placement.rank_of_expert(ids) == plan.pair_rank.unsqueeze(1)  # [P, k]
    local_ids = torch.where(on_dest, ids - plan.pair_rank.unsqueeze(1) * placement.experts_per_rank, -1)
    pair_weights = torch.where(on_dest, weights[plan.pair_token], 0.0)  # [P, k] fp32
    return torch.cat([pair_weights, local_ids.to(pair_weights.dtype)], dim=1)


def run_local_experts(
    rows: torch.Tensor, routing: torch.Tensor, experts: nn.Module, experts_per_rank: int
) -> torch.Tensor:
    """Step 4: received rows [R, hidden] and their routing [R, 2k] -> the gated sum of this rank's
    experts per received pair [R, hidden], the (pair, slot) rows sorted by local expert for one
    grouped-GEMM call."""
    top_k = routing.shape[1] // 2
    w_recv, ids_recv = routing[:, :top_k], routing[:, top_k:].detach().long()
    slot_pair, slot = (ids_recv >= 0).nonzero(as_tuple=True)  # [S]
    slot_expert = ids_recv[slot_pair, slot]
    order = slot_expert.argsort(stable=True)
    slot_pair, slot, slot_expert = slot_pair[order], slot[order], slot_expert[order]
    tokens_per_expert = torch.bincount(slot_expert, minlength=experts_per_rank)
    y = experts(rows[slot_pair], tokens_per_expert, w_recv[slot_pair, slot])  # [S, hidden], gated
    return sum_rows_by_index(y, slot_pair, rows.shape[0])  # [R, hidden]


class AllToAllDispatch:
    """Callable installed as `MoE.dispatch` on an EP rank (see module docstring)."""

    def __init__(
        self, placement: ExpertPlacement, group, fp8: bool, stats: RoutingStats | None = None
    ) -> None:
        self.placement = placement
        self.group = group
        self.fp8 = fp8
        self.stats = stats if stats is not None else RoutingStats()

    def __call__(
        self, flat: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, experts: nn.Module
    ) -> torch.Tensor:
        """flat [N, hidden], weights [N, k] fp32, expert_ids [N, k] (global ids) -> [N, hidden]."""
        # 1-2. unique (token, rank) pairs, rank-major, and the counts exchanged
        plan, send_splits, recv_splits = self.route(expert_ids)
        pair_token = plan.pair_token

        # 3. dispatch: hidden rows, and per pair the routing of its experts on the destination
        routing = pair_routing(plan, weights, expert_ids, self.placement)  # [P, 2k]
        dtype = compute_dtype(flat)
        rows = flat[pair_token]  # [P, hidden]
        if self.fp8:
            wire = []
            x_recv = dispatch_rows_fp8(
                rows, send_splits, recv_splits, self.group, dtype, wire.append
            )  # [R, hidden]
            sent = wire[0]
        else:
            sent = rows.to(dtype)
            x_recv = all_to_all_rows(sent, send_splits, recv_splits, self.group)
        routing_recv = all_to_all_rows(routing, send_splits, recv_splits, self.group)  # [R, 2k]

        # 4. local experts over the received (pair, slot) rows
        partial = run_local_experts(x_recv, routing_recv, experts, self.placement.experts_per_rank)

        # 5. combine back to the senders, sum per token
        partial = partial.to(dtype)
        back = all_to_all_rows(partial, recv_splits, send_splits, self.group)  # [P, hidden]
        self.stats.add_bytes(sent, partial)
        return sum_rows_by_index(back.to(flat.dtype), pair_token, flat.shape[0])

    def route(self, expert_ids: torch.Tensor) -> tuple[DispatchPlan, list[int], list[int]]:
        """Steps 1-2: the pairs, recorded in the statistics, and the splits (host lists, as
        all_to_all_single takes them: the one host synchronisation of a layer's dispatch).

        Why it stays: the receiving rank must know how many rows arrive to allocate the buffer
        and pass the splits, and torch's all-to-all takes them on the host. Removing it needs a
        dispatch kernel that writes into a worst-case buffer and reads the counts on the device
        (what DeepEP does). On a GPU it drains the compute stream up to the router: the one
        per-layer host synchronisation left in an overlapped pair (not yet removed)."""
        plan = plan_dispatch(expert_ids, self.placement)
        self._record(plan.send_mask)
        recv_counts = exchange_counts(plan.send_counts, self.group)
        send_splits, recv_splits = plan.send_counts.tolist(), recv_counts.tolist()
        self.stats.add_received(sum(recv_splits))
        return plan, send_splits, recv_splits

    def _record(self, send_mask: torch.Tensor) -> None:
        with torch.no_grad():
            ranks = send_mask.sum(dim=1)  # [N]
            node_of_rank = self.placement.node_of_rank_tensor(send_mask.device)
            nodes_hit = torch.zeros(
                send_mask.shape[0], self.placement.num_nodes, dtype=torch.bool, device=send_mask.device
            )
            token, rank = send_mask.nonzero(as_tuple=True)
            nodes_hit[token, node_of_rank[rank]] = True
            self.stats.add(ranks, nodes_hit.sum(dim=1))
