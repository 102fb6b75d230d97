"""Which rank and which node of an EP group holds which routed expert: the one mapping every other
part of expert parallelism reads (the builder, the dispatch, the routing statistics, the memory plan).

Experts are split into `ep` contiguous blocks: EP rank r holds experts [r * E/ep, (r+1) * E/ep).
Ranks are numbered in the EP group's order (the topology's dp replicas of one stage); nodes are
numbered by first appearance along that order. Group-limited routing (model.n_group groups of E /
n_group contiguous experts, topk_group kept per token) becomes node-limited routing exactly when
each node holds one whole group: n_group equals the number of nodes and every node holds the same
number of consecutive ranks. Then a token reaches at most topk_group nodes, as in DeepSeek-V3 (at
most 4 of 8 nodes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from moeforge.platform.config.builder import ConfigError


@dataclass(frozen=True)
class ExpertPlacement:
    """Routed experts over the `ep` ranks of an EP group; `ep_rank` is this rank's position in it."""

    n_experts: int
    ep: int
    ep_rank: int = 0
    node_of_rank: tuple[int, ...] = ()  # node index of each EP rank; () = all on one node
    # node_of_rank_tensor's tables, one per device (not part of the placement's value)
    _node_tables: dict[torch.device, torch.Tensor] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        if self.ep < 1 or self.n_experts % self.ep:
            raise ConfigError(
                f"parallel.ep: model.n_routed_experts ({self.n_experts}) must be divisible by ep ({self.ep})"
            )
        if not 0 <= self.ep_rank < self.ep:
            raise ValueError(f"ep_rank {self.ep_rank} outside an EP group of {self.ep}")
        if self.node_of_rank and len(self.node_of_rank) != self.ep:
            raise ValueError(f"node_of_rank: {len(self.node_of_rank)} entries for an EP group of {self.ep}")

    @classmethod
    def from_node_ids(cls, n_experts: int, ep_rank: int, node_ids: Sequence[str]) -> ExpertPlacement:
        """From each EP rank's node identity (Ray node id or host name), in EP-group order."""
        index: dict[str, int] = {}
        nodes = tuple(index.setdefault(n, len(index)) for n in node_ids)
        return cls(n_experts, len(node_ids), ep_rank, nodes)

    @classmethod
    def with_ranks_per_node(
        cls, n_experts: int, ep: int, ep_rank: int, ranks_per_node: int
    ) -> ExpertPlacement:
        """Consecutive blocks of `ranks_per_node` EP ranks per node (parallel.ep_ranks_per_node)."""
        return cls(n_experts, ep, ep_rank, tuple(r // ranks_per_node for r in range(ep)))

    # ---- experts and ranks -------------------------------------------------------------------------
    @property
    def experts_per_rank(self) -> int:
        return self.n_experts // self.ep

    @property
    def first_local_expert(self) -> int:
        return self.ep_rank * self.experts_per_rank

    @property
    def local_experts(self) -> range:
        return range(self.first_local_expert, self.first_local_expert + self.experts_per_rank)

    def rank_of_expert(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """EP rank holding each expert id (same shape)."""
        return torch.div(expert_ids, self.experts_per_rank, rounding_mode="floor")

    # ---- nodes -------------------------------------------------------------------------------------
    @property
    def nodes(self) -> tuple[int, ...]:
        return self.node_of_rank or (0,) * self.ep

    @property
    def num_nodes(self) -> int:
        return max(self.nodes) + 1

    def node_of_rank_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """`nodes` as an int64 [ep] tensor on `device`: built on the first call per device, then the
        same tensor (the placement is fixed for a run; a copy per layer call would be a host-to-device
        copy on the dispatch's path). Read it, never write it."""
        device = torch.device(device)
        table = self._node_tables.get(device)
        if table is None:
            table = self._node_tables[device] = torch.tensor(self.nodes, dtype=torch.long, device=device)
        return table

    def node_limited(self, n_group: int) -> bool:
        """True when the router's expert groups are exactly the nodes' expert sets, so topk_group
        bounds the nodes a token reaches (see module docstring)."""
        nodes = self.nodes
        if n_group != self.num_nodes or self.ep % self.num_nodes:
            return False
        per_node = self.ep // self.num_nodes
        return all(nodes[r] == r // per_node for r in range(self.ep))


def this_node_id() -> str:
    """This process's node identity: the Ray node id inside a Ray worker, else the host name."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    import socket

    return socket.gethostname()


def expert_placement(parallel, n_experts: int, groups, rank: int) -> ExpertPlacement | None:
    """This rank's placement under `parallel` (a ParallelConfig), or None without expert parallelism.

    Nodes come from the run's realized placement (`platform.launch.rank_placement.current_placement`:
    where Ray put the workers, after the ranks were renumbered to the plan). Outside a Ray Train run
    (spawn_gloo) there is none, and the EP group shares its node ids in one collective instead;
    parallel.ep_ranks_per_node pretends nodes instead of either."""
    if parallel.ep == 1:
        return None
    import torch.distributed as dist

    ep_ranks = groups.ranks["ep"]
    ep_rank = ep_ranks.index(rank)
    if parallel.ep_ranks_per_node:
        return ExpertPlacement.with_ranks_per_node(
            n_experts, parallel.ep, ep_rank, parallel.ep_ranks_per_node
        )
    from moeforge.platform.launch.rank_placement import current_placement

    realized = current_placement()
    if realized is not None:
        return ExpertPlacement.from_node_ids(n_experts, ep_rank, realized.node_ids(ep_ranks))
    node_ids: list[str | None] = [None] * len(ep_ranks)
    dist.all_gather_object(node_ids, this_node_id(), group=groups.ep)
    return ExpertPlacement.from_node_ids(n_experts, ep_rank, node_ids)
