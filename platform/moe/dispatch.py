"""AllToAllDispatch: the routed part of an MoE layer when its experts are spread over an EP group.

Per layer call, on every EP rank at once (collective over the group):

The layer call is four seams (`route`, the dispatch, `experts`, the combine), with the local work
around the transfers in `pack` and `unpack`; the plain call runs them in a row, `phased.PhasedMoE`
interleaves them with another micro-batch's compute.

    1. destinations   each token's top-k experts -> the EP ranks holding them; the unique (token,
                      rank) pairs, ordered by rank then token. A token whose k experts share a rank
                      is sent to it ONCE (as V3 sends a token to a node once), with the routing of
                      all its experts there.
    2. counts         pairs (and their (token, expert) slots) per destination exchanged first,
                      over `counts_group`: splits are uneven (dropless routing, no capacity factor,
                      no token ever dropped); read to the host once, as all_to_all_single takes them
    3. dispatch       the pairs' hidden vectors: FP8 e4m3 + 1x128 scales under precision=fp8,
                      otherwise the compute dtype; beside them, per pair, its k gate weights and
                      local expert ids (weight 0 / id -1 for experts on other ranks), in fp32
    4. experts        received (pair, slot) rows sorted by local expert, one grouped-GEMM call
                      (the experts module precision installed), gated by their weights, summed
                      per pair: one partial output per received pair
    5. combine        partial outputs back to their senders in the compute dtype, summed per token

Backward runs the reverse all-to-alls inside autograd (`all_to_all_rows`, below) on the forward's
host splits; gradients travel in the compute dtype. The gate weights travel with autograd too, so
the router receives the same gradient as on one device.

Host reads: the splits of step 2, once per layer call, and nothing else forward or backward. The
pairs and the experts' row order are built on the device with shapes fixed by the input or by
those splits (a stable partition instead of nonzero, scatter-adds instead of bincount).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from moeforge.kernels.compute_dtype import compute_dtype
from moeforge.kernels.token_compress import compress_tokens, decompress_tokens
from moeforge.model.moe import count_per_index, sum_rows_by_index
from moeforge.platform.moe.expert_placement import ExpertPlacement
from moeforge.platform.moe.routing_stats import RoutingStats
from torch import nn


@dataclass
class DispatchPlan:
    """Where one layer call's tokens go: the unique (token, EP rank) pairs, rank-major."""

    send_mask: torch.Tensor  # [N, ep] bool: token n has at least one expert on rank r
    pair_rank: torch.Tensor  # [P] destination of each pair
    pair_token: torch.Tensor  # [P] token of each pair
    send_counts: torch.Tensor  # [ep] pairs per destination
    slot_counts: torch.Tensor  # [ep] (token, expert) pairs per destination: rows its experts compute


@dataclass(frozen=True)
class Splits:
    """The host side of one layer call's dispatch, read in one go after the count exchange."""

    send: list[int]  # pairs to each EP rank (rows of the dispatch, of the combine's reverse)
    recv: list[int]  # pairs from each EP rank
    recv_slots: int  # (pair, local expert) rows this rank's experts compute


def destination_counts(
    expert_ids: torch.Tensor, placement: ExpertPlacement
) -> tuple[torch.Tensor, torch.Tensor]:
    """expert_ids [N, k] -> (send_mask [N, ep] bool, counts [ep, 2] int64: per destination its
    pairs and its (token, expert) slots), on the device."""
    dest = placement.rank_of_expert(expert_ids)  # [N, k]
    experts_on = torch.zeros(expert_ids.shape[0], placement.ep, dtype=torch.long, device=expert_ids.device)
    experts_on.scatter_add_(1, dest, torch.ones_like(dest))  # [N, ep]: token n's experts on rank r
    send_mask = experts_on > 0
    return send_mask, torch.stack([send_mask.sum(dim=0), experts_on.sum(dim=0)], dim=1)  # [ep, 2]


def true_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the True entries of a 1-D bool mask, ascending, [count] (count = mask.sum(), known
    on the host): nonzero's answer without its host read. A stable partition: each True entry goes
    to the number of Trues before it, each False one after all the Trues, in order."""
    index = torch.arange(mask.numel(), device=mask.device)
    if mask.numel() == 0:
        return index
    upto = mask.cumsum(0)  # [n] Trues in [0, i]
    slot = torch.where(mask, upto - 1, upto[-1] + index - upto)  # a permutation of [0, n)
    return torch.empty_like(index).scatter_(0, slot, index)[:count]


def rank_major_pairs(send_mask: torch.Tensor, n_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """send_mask [N, ep] -> (pair_rank [P], pair_token [P]) of its True entries ordered by rank, then
    token (send_mask.t().nonzero()'s order); P = n_pairs, the number of True entries."""
    n_tokens = send_mask.shape[0]
    index = true_positions(send_mask.t().reshape(-1), n_pairs)  # [P] into the [ep * N] rank-major mask
    if n_tokens == 0:
        return index, index
    return index // n_tokens, index % n_tokens


def plan_dispatch(
    expert_ids: torch.Tensor, placement: ExpertPlacement, n_pairs: int | None = None
) -> DispatchPlan:
    """Step 1 of the dispatch (also what `moeforge-bench ep` sends): expert_ids [N, k] -> the pairs.
    `n_pairs` is their number when the host knows it (the dispatch reads it with the splits); None
    reads it from the device here (benches and tests)."""
    send_mask, counts = destination_counts(expert_ids, placement)
    if n_pairs is None:
        n_pairs = int(counts[:, 0].sum())
    pair_rank, pair_token = rank_major_pairs(send_mask, n_pairs)
    return DispatchPlan(send_mask, pair_rank, pair_token, counts[:, 0], counts[:, 1])


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
    rows: torch.Tensor, routing: torch.Tensor, experts: nn.Module, experts_per_rank: int, n_slots: int
) -> torch.Tensor:
    """Step 4: received rows [R, hidden] and their routing [R, 2k] -> the gated sum of this rank's
    experts per received pair [R, hidden], the (pair, slot) rows sorted by local expert for one
    grouped-GEMM call. `n_slots`: the (pair, slot) rows with a local expert (Splits.recv_slots)."""
    top_k = routing.shape[1] // 2
    w_recv, ids_recv = routing[:, :top_k], routing[:, top_k:].detach().long()  # [R, k] each
    key = torch.where(ids_recv >= 0, ids_recv, experts_per_rank).flatten()  # [R*k]: other ranks' last
    # by local expert, (pair, slot) order within one; the other ranks' slots sort last and are cut
    order = key.argsort(stable=True)[:n_slots]  # [S]
    slot_pair, slot = order // top_k, order % top_k
    tokens_per_expert = count_per_index(key, experts_per_rank + 1)[:experts_per_rank]
    y = experts(rows[slot_pair], tokens_per_expert, w_recv[slot_pair, slot])  # [S, hidden], gated
    return sum_rows_by_index(y, slot_pair, rows.shape[0])  # [R, hidden]


class AllToAllDispatch:
    """Callable installed as `MoE.dispatch` on an EP rank (see module docstring).

    `group` carries the tokens; `counts_group` (default: `group`) only the count exchange. Under
    NCCL all collectives of one group share one stream, so an overlapped pair's count exchange would
    queue behind the other micro-batch's bulk all-to-all: a second group over the same ranks gives
    it a stream of its own."""

    def __init__(
        self,
        placement: ExpertPlacement,
        group,
        fp8: bool,
        stats: RoutingStats | None = None,
        counts_group=None,
    ) -> None:
        self.placement = placement
        self.group = group
        self.counts_group = group if counts_group is None else counts_group
        self.fp8 = fp8
        self.stats = stats if stats is not None else RoutingStats()

    def __call__(
        self, flat: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, experts: nn.Module
    ) -> torch.Tensor:
        """flat [N, hidden], weights [N, k] fp32, expert_ids [N, k] (global ids) -> [N, hidden]: the
        seams in a row, each transfer waited on where it is issued (PhasedMoE interleaves them)."""
        plan, splits = self.route(expert_ids)  # route, and the dispatch's count exchange
        rows, routing = self.pack(plan, flat, weights, expert_ids)  # [P, hidden], [P, 2k]
        dtype = compute_dtype(flat)
        if self.fp8:  # dispatch: the rows, then their routing
            wire = []
            x_recv = dispatch_rows_fp8(rows, splits.send, splits.recv, self.group, dtype, wire.append)
            sent = wire[0]
        else:
            sent = rows.to(dtype)
            x_recv = all_to_all_rows(sent, splits.send, splits.recv, self.group)  # [R, hidden]
        routing_recv = all_to_all_rows(routing, splits.send, splits.recv, self.group)  # [R, 2k]
        partial = self.experts(x_recv, routing_recv, experts, splits).to(dtype)  # [R, hidden]
        back = all_to_all_rows(partial, splits.recv, splits.send, self.group)  # combine: [P, hidden]
        self.stats.add_bytes(sent, partial)
        return self.unpack(back, plan, flat)

    # --- the seams: route | dispatch | experts | combine. Only the dispatch (the count exchange
    # in `route`, then the rows) and the combine communicate; pack, experts and unpack are local.
    def route(self, expert_ids: torch.Tensor) -> tuple[DispatchPlan, Splits]:
        """The pairs, recorded in the statistics, and the splits (the dispatch's count exchange).

        The splits are the one host synchronisation of a layer call, forward and backward: the
        receiving rank must know how many rows arrive to allocate the buffer, and torch's
        all-to-all takes the splits on the host. Removing it needs a dispatch kernel that writes into
        a worst-case buffer and reads the counts on the device (what DeepEP does). Everything else
        (the pairs, the experts' row order, the statistics) is built on the device, sized from
        these splits."""
        send_mask, send_counts = destination_counts(expert_ids, self.placement)  # [N, ep], [ep, 2]
        recv_counts = exchange_counts(send_counts, self.counts_group)  # [ep, 2]
        ep = self.placement.ep
        # host values for all_to_all_single: sent and received counts in one read
        counts = torch.cat([send_counts, recv_counts]).tolist()  # [2 * ep] x [pairs, slots]
        splits = Splits(
            send=[c[0] for c in counts[:ep]],
            recv=[c[0] for c in counts[ep:]],
            recv_slots=sum(c[1] for c in counts[ep:]),
        )
        pair_rank, pair_token = rank_major_pairs(send_mask, sum(splits.send))
        plan = DispatchPlan(send_mask, pair_rank, pair_token, send_counts[:, 0], send_counts[:, 1])
        self.stats.add(*spread_per_token(send_mask, self.placement))
        self.stats.add_received(sum(splits.recv))
        return plan, splits

    def pack(
        self, plan: DispatchPlan, flat: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the dispatch sends, rank-major: the pairs' rows [P, hidden] (in flat's dtype; the
        caller casts or quantizes them for the wire) and their routing [P, 2k] fp32."""
        return flat[plan.pair_token], pair_routing(plan, weights, expert_ids, self.placement)

    def experts(
        self, rows: torch.Tensor, routing: torch.Tensor, experts: nn.Module, splits: Splits
    ) -> torch.Tensor:
        """Received rows [R, hidden] and routing [R, 2k] -> this rank's gated partial sums [R, hidden]."""
        return run_local_experts(rows, routing, experts, self.placement.experts_per_rank, splits.recv_slots)

    @staticmethod
    def unpack(back: torch.Tensor, plan: DispatchPlan, flat: torch.Tensor) -> torch.Tensor:
        """The combined rows [P, hidden], summed per token -> [N, hidden] in flat's dtype."""
        return sum_rows_by_index(back.to(flat.dtype), plan.pair_token, flat.shape[0])


@torch.no_grad()
def spread_per_token(
    send_mask: torch.Tensor, placement: ExpertPlacement
) -> tuple[torch.Tensor, torch.Tensor]:
    """send_mask [N, ep] -> (distinct EP ranks [N], distinct nodes [N]) each token is sent to, on
    the device (what RoutingStats adds up)."""
    node_of_rank = placement.node_of_rank_tensor(send_mask.device)  # [ep], built once per device
    ranks_on_node = torch.zeros(
        send_mask.shape[0], placement.num_nodes, dtype=torch.long, device=send_mask.device
    ).index_add_(1, node_of_rank, send_mask.long())  # [N, nodes]
    return send_mask.sum(dim=1), (ranks_on_node > 0).sum(dim=1)


# ---- the EP collectives, inside autograd ----------------------------------------------------------
# The EP collectives, inside autograd: counts first, then rows with uneven splits.
#
# Every call is collective over `group`: each EP rank must make the same calls in the same order
# (dp replicas of a stage run the same schedule action list, so their MoE layers do). Splits are in
# rows, per destination rank in group order. Works on gloo (CPU) and NCCL (GPU) alike.
#
#     exchange_counts     how many rows each rank will send me (one small all-to-all; its own group
#                         may be given, so that it does not queue behind bulk all-to-alls)
#     all_to_all_rows     rows of any dtype; backward sends the gradient back the reverse way
#     launch_all_to_all   one asynchronous all-to-all (outside autograd), awaited where its result is
#                         consumed: the phase programs of DualPipe's overlap (`phased.PhasedMoE`, the
#                         overlap bench)
#     dispatch_rows_fp8   rows as FP8 e4m3 with 1x128 power-of-two tile scales (`kernels.token_compress`),
#                         D + D/128 bytes per row; decompressed on arrival. Backward: the gradient
#                         travels back in the compute dtype, unquantised (straight through the
#                         rounding), as DeepSeek-V3 keeps the backward combine/dispatch in BF16.


def exchange_counts(send_counts: torch.Tensor, group) -> torch.Tensor:
    """send_counts [ep, ...] (what I send each rank: row r goes to rank r) -> recv_counts [ep, ...]
    (row r: what rank r sends me). Stays on the device; reading it is the caller's choice."""
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts.contiguous(), group=group)
    return recv


@dataclass
class InFlight:
    """An all-to-all launched asynchronously: `out` is valid once `wait()` returned."""

    work: object
    out: torch.Tensor

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.out


class CollectiveTracker(Protocol):
    """Something that times launched collectives (the rank's P2P endpoint): wraps the work so that
    its wait is recorded (exposed time, timeline span)."""

    def track_collective(self, work: object, out: torch.Tensor, label: str): ...


def launch_all_to_all(
    x: torch.Tensor,
    send_splits: list[int],
    recv_splits: list[int],
    group,
    tracker: CollectiveTracker | None = None,
    label: str = "all-to-all",
):
    """Start x [sum(send_splits), ...] -> [sum(recv_splits), ...] without waiting; the returned handle's
    `wait()` gives the received rows. With a `tracker`, the wait is timed under `label`."""
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    work = dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group, async_op=True)
    if tracker is not None:
        return tracker.track_collective(work, out, label)
    return InFlight(work, out)


def _exchange(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return _exchange(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        return _exchange(grad, recv_splits, send_splits, ctx.group), None, None, None


def all_to_all_rows(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    """x [sum(send_splits), ...] -> [sum(recv_splits), ...]: rows send_splits[r] go to rank r."""
    return _AllToAllRows.apply(x, send_splits, recv_splits, group)


class _DispatchFP8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group, out_dtype, on_wire):
        ctx.splits, ctx.group, ctx.in_dtype = (send_splits, recv_splits), group, x.dtype
        d = x.shape[-1]
        payload, scales = compress_tokens(x)  # [T, D] e4m3 bits, [T, D/128] exponents
        packed = torch.cat([payload, scales], dim=-1)  # [T, D + D/128] uint8: one message per row
        if on_wire is not None:
            on_wire(packed)
        received = _exchange(packed, send_splits, recv_splits, group)
        return decompress_tokens(received[:, :d], received[:, d:], out_dtype)

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        grad_in = _exchange(grad, recv_splits, send_splits, ctx.group)
        return grad_in.to(ctx.in_dtype), None, None, None, None, None


def dispatch_rows_fp8(
    x: torch.Tensor,
    send_splits: list[int],
    recv_splits: list[int],
    group,
    out_dtype: torch.dtype,
    on_wire: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """x [T, D] (D a multiple of 128) -> [sum(recv_splits), D] in `out_dtype`, sent as FP8 tiles.
    `on_wire` (optional) sees the packed uint8 tensor handed to the all-to-all: what travels."""
    return _DispatchFP8.apply(x, send_splits, recv_splits, group, out_dtype, on_wire)


def fp8_row_bytes(hidden: int) -> int:
    """Bytes one row occupies on the wire under FP8 dispatch: e4m3 values plus one scale per 128."""
    return hidden + hidden // 128
