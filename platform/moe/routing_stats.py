"""How far each token travels under expert parallelism: distinct EP ranks and nodes per token.

DeepSeek-V3 bounds the nodes (at most 4) because inter-node bandwidth is the scarce resource; these
counters show what the router did. Each MoE layer's dispatch adds to one `RoutingStats` per rank;
the runtime reduces them over the world once per step
(`platform.engine.rank_engine.RankEngine._routing_summary`).

The per-token figures stay on the layer's device (sums and maxima added to without a host read: a
dispatch must not wait for its device); the sizes the host knows anyway (tokens, bytes handed to the
all-to-alls, rows received) are host integers. `as_tensor()` joins both, once per step.
"""

from __future__ import annotations

import torch


class RoutingStats:
    """Sums over the (token, layer) dispatches since the last reset."""

    def __init__(self) -> None:
        self.tokens = 0
        self.dispatch_bytes = 0  # token payload handed to the dispatch all-to-all (self-sends included)
        self.combine_bytes = 0  # partial outputs handed to the combine all-to-all
        self.recv_rows = 0  # (token, rank) pairs this rank received: its experts' share of the work
        # [rank_sum, node_sum, rank_max, node_max] int64 on the device of the first dispatch added
        self._spread: torch.Tensor | None = None

    def add(self, ranks_per_token: torch.Tensor, nodes_per_token: torch.Tensor) -> None:
        """ranks_per_token, nodes_per_token [N]: one dispatch's distinct destinations per token."""
        if ranks_per_token.numel() == 0:
            return
        self.tokens += ranks_per_token.numel()
        with torch.no_grad():
            per_token = torch.stack([ranks_per_token, nodes_per_token]).long()  # [2, N]
            if self._spread is None:
                self._spread = torch.zeros(4, dtype=torch.long, device=per_token.device)
            self._spread[:2] += per_token.sum(dim=1)
            self._spread[2:] = torch.maximum(self._spread[2:], per_token.amax(dim=1))

    def add_received(self, rows: int) -> None:
        self.recv_rows += rows

    def add_bytes(self, dispatch: torch.Tensor, combine: torch.Tensor) -> None:
        """The tensors one dispatch handed to its token and combine all-to-alls."""
        self.dispatch_bytes += dispatch.numel() * dispatch.element_size()
        self.combine_bytes += combine.numel() * combine.element_size()

    def reset(self) -> None:
        self.tokens = self.dispatch_bytes = self.combine_bytes = self.recv_rows = 0
        if self._spread is not None:
            self._spread.zero_()

    def as_tensor(self) -> torch.Tensor:
        """[tokens, rank_sum, node_sum, rank_max, node_max, dispatch_bytes, combine_bytes, recv_rows,
        dispatched (1 if this rank routed any token)] float64, on the dispatches' device (the CPU
        before any), for reduction over ranks. A new tensor: `reset()` leaves it as it is."""
        host = [self.tokens, self.dispatch_bytes, self.combine_bytes, self.recv_rows, 1 if self.tokens else 0]
        device = self._spread.device if self._spread is not None else torch.device("cpu")
        host_values = torch.tensor(host, dtype=torch.float64, device=device)
        spread = self._spread if self._spread is not None else torch.zeros(4, dtype=torch.long)
        return torch.cat([host_values[:1], spread.double(), host_values[1:]])

    # Host reads of the device sums, for tests and reports (not the hot path)
    @property
    def rank_sum(self) -> int:
        return int(self.as_tensor()[1])

    @property
    def node_sum(self) -> int:
        return int(self.as_tensor()[2])

    @property
    def rank_max(self) -> int:
        return int(self.as_tensor()[3])

    @property
    def node_max(self) -> int:
        return int(self.as_tensor()[4])


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
