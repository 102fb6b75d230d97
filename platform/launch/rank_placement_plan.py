"""The placement plan: which world rank runs on which node (pure: no Ray, no torch.distributed).

Realizing it on Ray (the workers' node reports, renumbering, the process group, placement.json) is
`platform.launch.rank_placement.place_workers`; waiting for the cluster's nodes is
`platform.launch.cluster_wait`.

The plan (`plan_placement`, pure) takes the run's layout (`platform.engine.topology.Topology`: world rank ->
pp, dp and EP coordinates) and the nodes with the number of workers each can host, and puts

1. the ranks of one EP group on as few nodes as the slots allow: the MoE all-to-all is the heaviest
   traffic of a step, and DeepSeek-V3 dispatches inside a node first (NVLink, ~160 GB/s) and across
   nodes second (IB, ~40-50 GB/s), each token to at most 4 nodes;
2. then pipeline neighbours (pp rank r and r+1 of one replica) on the same node where the EP groups
   leave room, since their activations and gradients go point to point at every micro-batch.

It lays whole EP groups onto nodes in one order: for each block of `ep` dp replicas, the groups of
its stages (pp rank 0, 1, ...), block after block. Nodes are filled largest first: (1) whole blocks
(pp * ep ranks, consecutive in the topology: the plan is the topology's own order when every
node's slots are a multiple of that); (2) then whole groups, a node taking consecutive stages while
it has room; (3) groups that no node can hold whole (slots not a multiple of ep) are split over the
nodes with the most free slots, in as few pieces as those allow. The nodes per EP group are the
fewest possible (`tests.test_placement.test_plan_nodes_per_ep_group_is_minimal` checks it against every
assignment of small layouts); pipeline neighbours are kept together greedily: as few links cross nodes
as possible on nodes of one size whose slots are a multiple of ep (every such small case checked), while
on uneven nodes, or where groups must be split, a link or two more than needed may cross.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from moeforge.platform.config.builder import ConfigError
from moeforge.platform.engine.topology import Topology


# ---- the plan -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlacementPlan:
    """`node_of_rank[r]`: the node (an id) world rank r runs on."""

    topo: Topology
    node_of_rank: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.node_of_rank) != self.topo.world_size:
            raise ValueError(f"{len(self.node_of_rank)} nodes for a world of {self.topo.world_size}")

    @property
    def nodes(self) -> tuple[str, ...]:
        """The nodes used, in order of their lowest rank."""
        return tuple(dict.fromkeys(self.node_of_rank))

    def ranks_on(self, node: str) -> list[int]:
        return [r for r, n in enumerate(self.node_of_rank) if n == node]

    def ep_groups(self) -> list[list[int]]:
        return self.topo.all_groups()["ep"]

    def ep_group_nodes(self) -> list[int]:
        """How many nodes each EP group (in `ep_groups()` order) spans."""
        return [len({self.node_of_rank[r] for r in group}) for group in self.ep_groups()]

    def pipeline_links(self) -> list[tuple[int, int]]:
        """Point-to-point neighbours: (pp rank r, pp rank r+1) of each dp replica."""
        topo = self.topo
        return [
            (topo.rank_of(p, d), topo.rank_of(p + 1, d)) for d in range(topo.dp) for p in range(topo.pp - 1)
        ]

    def pipeline_links_across_nodes(self) -> int:
        return sum(self.node_of_rank[a] != self.node_of_rank[b] for a, b in self.pipeline_links())


def ep_ordered_groups(topo: Topology) -> list[list[int]]:
    """The EP groups in the order the plan lays them onto nodes: for each block of `ep` dp
    replicas, the stages' groups by pp rank (pipeline neighbours next to each other)."""
    return [
        [topo.rank_of(p, block * topo.ep + i) for i in range(topo.ep)]
        for block in range(topo.dp // topo.ep)
        for p in range(topo.pp)
    ]


def plan_placement(topo: Topology, slots: Mapping[str, int]) -> PlacementPlan:
    """Plan which node each world rank of `topo` runs on (see the module docstring).

    `slots`: node id -> workers it can host (GPUs, or CPU slots). Nodes are filled largest first,
    ties in the order given, so with more slots than ranks the run lands on few nodes (a node
    takes a group only whole, unless no node can). Raises ConfigError when the slots are too few."""
    world = topo.world_size
    for node, count in slots.items():
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"slots of node {node!r} must be an integer >= 0, got {count!r}")
    total = sum(slots.values())
    if total < world:
        raise ConfigError(
            f"parallel: {world} workers (pp={topo.pp} x dp={topo.dp}) need {world} worker slots, "
            f"the nodes have {total}"
        )
    # The largest nodes first (ties in the caller's order): they take the most whole groups.
    free = {node: slots[node] for node in sorted(slots, key=lambda n: -slots[n]) if slots[node] > 0}

    node_of: dict[int, str] = {}
    ep, block = topo.ep, topo.pp * topo.ep
    groups = ep_ordered_groups(topo)
    blocks = [groups[i : i + topo.pp] for i in range(0, len(groups), topo.pp)]

    def put(group: list[int], node: str) -> None:
        for rank in group:
            node_of[rank] = node
        free[node] -= len(group)

    # 1. Whole pipeline blocks (the pp stages' EP groups of one block of ep dp replicas: ranks
    #    consecutive in the topology), as many as each node holds.
    for node in list(free):
        while blocks and free[node] >= block:
            for group in blocks.pop(0):
                put(group, node)
    # 2. The rest group by group, in order, each whole: on the node of the previous group while it
    #    has room (consecutive stages together), else on the node with the most room.
    pending = [group for rest in blocks for group in rest]
    node = None
    while pending:
        roomy = [n for n in free if free[n] >= ep]
        if not roomy:
            break
        if node not in roomy:
            node = max(roomy, key=lambda n: free[n])
        put(pending.pop(0), node)
    # 3. Groups no node holds whole: each over the nodes with the most free slots, filling one
    #    before the next, so it lands in as few pieces as the slots left allow.
    for group in pending:
        todo = list(group)
        while todo:
            node = max(free, key=lambda n: free[n])  # the first of the largest
            take, todo = todo[: free[node]], todo[free[node] :]
            put(take, node)
    return PlacementPlan(topo, tuple(node_of[r] for r in range(world)))
