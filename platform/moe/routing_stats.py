"""How far each token travels under expert parallelism: distinct EP ranks and nodes per token.

DeepSeek-V3 bounds the nodes (at most 4) because inter-node bandwidth is the scarce resource; these
counters show what the router did. Each MoE layer's dispatch adds to one `RoutingStats` per rank;
the runtime reduces them over the world once per step (platform/runtime/rank_state.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RoutingStats:
    """Sums over the (token, layer) dispatches since the last reset."""

    tokens: int = 0
    rank_sum: int = 0
    rank_max: int = 0
    node_sum: int = 0
    node_max: int = 0
    dispatch_bytes: int = 0  # token payload handed to the dispatch all-to-all (self-sends included)
    combine_bytes: int = 0  # partial outputs handed to the combine all-to-all
    recv_rows: int = 0  # (token, rank) pairs this rank received: its experts' share of the work

    def add(self, ranks_per_token: torch.Tensor, nodes_per_token: torch.Tensor) -> None:
        """ranks_per_token, nodes_per_token [N]: one dispatch's distinct destinations per token."""
        if ranks_per_token.numel() == 0:
            return
        self.tokens += ranks_per_token.numel()
        self.rank_sum += int(ranks_per_token.sum())
        self.rank_max = max(self.rank_max, int(ranks_per_token.max()))
        self.node_sum += int(nodes_per_token.sum())
        self.node_max = max(self.node_max, int(nodes_per_token.max()))

    def add_received(self, rows: int) -> None:
        self.recv_rows += rows

    def add_bytes(self, dispatch: torch.Tensor, combine: torch.Tensor) -> None:
        """The tensors one dispatch handed to its token and combine all-to-alls."""
        self.dispatch_bytes += dispatch.numel() * dispatch.element_size()
        self.combine_bytes += combine.numel() * combine.element_size()

    def reset(self) -> None:
        self.tokens = self.rank_sum = self.rank_max = self.node_sum = self.node_max = 0
        self.dispatch_bytes = self.combine_bytes = self.recv_rows = 0

    def as_tensor(self) -> torch.Tensor:
        """[tokens, rank_sum, node_sum, rank_max, node_max, dispatch_bytes, combine_bytes, recv_rows,
        dispatched (1 if this rank routed any token)] float64, for reduction over ranks."""
        values = [self.tokens, self.rank_sum, self.node_sum, self.rank_max, self.node_max]
        values += [self.dispatch_bytes, self.combine_bytes, self.recv_rows, 1 if self.tokens else 0]
        return torch.tensor(values, dtype=torch.float64)


def routing_summary(summed: torch.Tensor, maxed: torch.Tensor) -> dict[str, float]:
    """Metrics from `as_tensor()` reduced with SUM (`summed`) and MAX (`maxed`) over ranks."""
    tokens = float(summed[0])
    if tokens == 0:
        return {}
    return {
        "ep_ranks_per_token_mean": float(summed[1]) / tokens,
        "ep_ranks_per_token_max": float(maxed[3]),
        "ep_nodes_per_token_mean": float(summed[2]) / tokens,
        "ep_nodes_per_token_max": float(maxed[4]),
        "ep_dispatch_bytes": float(summed[5]),
        "ep_combine_bytes": float(summed[6]),
        # the busiest EP rank's received rows over the mean of the ranks that route tokens: the
        # expert-parallel straggler (1.0 = every rank's experts got the same number of rows)
        "ep_recv_max_over_mean": float(maxed[7]) / (float(summed[7]) / float(summed[8]))
        if float(summed[7]) > 0
        else 1.0,
    }
