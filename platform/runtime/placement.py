"""Which world rank runs on which node: the plan, its realization on Ray, and the wait for the nodes.

The plan (`plan_placement`, pure) takes the run's layout (platform/runtime/topology.py: world rank ->
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
fewest possible (tests/test_placement.py checks it against every assignment of small layouts);
pipeline neighbours are kept together greedily: as few links cross nodes as possible on nodes of
one size whose slots are a multiple of ep (every such small case checked), while on uneven nodes,
or where groups must be split, a link or two more than needed may cross.

Realization on Ray Train (v2, Ray 2.60). Ray Train reserves one placement group with one identical
bundle per worker (`ScalingConfig.placement_strategy`, PACK by default: as few nodes as fit;
`label_selector` can pin bundles to labelled nodes) and then numbers the workers itself: grouped by
node, in the order the nodes first appear among the bundles (`WorkerGroup._assign_worker_ranks`).
So the ranks of one node are always consecutive, and which nodes an autoscaler will add is not
known when the driver starts. Neither can place an EP group whose dp replicas are `pp` ranks apart
(pp=2, dp=4, ep=4 on two 4-slot nodes wants ranks 0 2 4 6 on one node). Instead every worker
reports the node Ray put it on (`place_workers`, a collective over Ray Train's process group), each
computes the same plan for the nodes as they are, and the workers of a node take that node's ranks
of the plan. When that numbering differs from Ray Train's, the default torch.distributed group is
made again with the plan's ranks (on a fresh port of the new rank 0); otherwise nothing changes.

The realized mapping (world rank -> node id and ip, Ray Train's rank, pp, dp and EP coordinates) is
printed by rank 0 as one table and saved as `placement.json` in run.dir. Expert placement
(platform/moe/placement.py) gathers every EP rank's Ray node id after this, so its node numbering,
and with it node-limited routing and the nodes-per-token statistics, follows this mapping;
`current_placement()` holds it in the worker process for any part that wants it without a
collective.

Waiting for the cluster (driver): Ray Train's own worker-group start waits at most `cluster.wait_s`
for its placement group (`workers_wait_at_most`), whose pending demand is what makes an autoscaler
add nodes, and which then gets those very nodes; past that the run fails with what it asked for
and what the cluster has (`wait_error`). A probe placement group reserved and released before Ray
Train's was tried first and dropped: under a short idle timeout the autoscaler removed the nodes
it had added for the probe before Ray Train asked for them, and added two more.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from moeforge.model.config import ConfigError
from moeforge.platform.runtime.topology import Topology

PLACEMENT_FILE = "placement.json"


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


# ---- realization: match the plan to where Ray put the workers --------------------------------------
@dataclass(frozen=True)
class WorkerSite:
    """Where one Ray Train worker runs, as it reports it."""

    ray_rank: int
    node_id: str
    node_ip: str
    free_port: int = 0  # a port free on its node, for a new process group when it becomes rank 0


@dataclass(frozen=True)
class Placement:
    """The realized mapping: `rank_of_ray_rank[i]` is the world rank of Ray Train's worker i."""

    plan: PlacementPlan
    sites: tuple[WorkerSite, ...]  # by Ray Train rank
    rank_of_ray_rank: tuple[int, ...]

    @property
    def remapped(self) -> bool:
        return any(rank != i for i, rank in enumerate(self.rank_of_ray_rank))

    def site_of_rank(self, rank: int) -> WorkerSite:
        return self.sites[self.rank_of_ray_rank.index(rank)]

    def node_ids(self, ranks: Sequence[int]) -> list[str]:
        """The node id of each of `ranks` (e.g. an EP group, in its order)."""
        return [self.plan.node_of_rank[r] for r in ranks]

    def to_dict(self) -> dict:
        topo, plan = self.plan.topo, self.plan
        rows = []
        for rank in range(topo.world_size):
            site = self.site_of_rank(rank)
            pp_rank, dp_rank = topo.coords(rank)
            rows.append(
                {
                    "rank": rank,
                    "ray_rank": site.ray_rank,
                    "node_id": site.node_id,
                    "node_ip": site.node_ip,
                    "pp_rank": pp_rank,
                    "dp_rank": dp_rank,
                    "ep_rank": topo.ep_rank(rank),
                }
            )
        nodes = [
            {
                "node_id": node,
                "node_ip": self.site_of_rank(plan.ranks_on(node)[0]).node_ip,
                "ranks": plan.ranks_on(node),
            }
            for node in plan.nodes
        ]
        groups = plan.ep_groups()
        return {
            "layout": {"pp": topo.pp, "dp": topo.dp, "ep": topo.ep, "pipeline_layout": topo.layout},
            "remapped": self.remapped,
            "ranks": rows,
            "nodes": nodes,
            "ep_groups": [
                {"ranks": g, "nodes": n} for g, n in zip(groups, plan.ep_group_nodes(), strict=True)
            ],
            "pipeline_links": len(plan.pipeline_links()),
            "pipeline_links_across_nodes": plan.pipeline_links_across_nodes(),
        }


def match_plan(topo: Topology, sites: Sequence[WorkerSite]) -> Placement:
    """The plan for the nodes the workers are on (each node's slots: its workers), and the world rank
    of every worker: the workers of a node, by Ray Train rank, take that node's planned ranks in
    ascending order. That is Ray Train's own numbering when the plan gives each node a block of
    consecutive ranks in Ray Train's node order (a node's slots a multiple of pp * ep, or ep = 1,
    on nodes of one size)."""
    sites = tuple(sorted(sites, key=lambda s: s.ray_rank))
    if [s.ray_rank for s in sites] != list(range(topo.world_size)):
        raise ValueError(f"expected one site per Ray Train rank 0..{topo.world_size - 1}, got {sites}")
    on_node: dict[str, list[int]] = {}
    for site in sites:
        on_node.setdefault(site.node_id, []).append(site.ray_rank)
    plan = plan_placement(topo, {node: len(ray_ranks) for node, ray_ranks in on_node.items()})
    rank_of_ray_rank = [0] * topo.world_size
    for node, ray_ranks in on_node.items():
        for ray_rank, rank in zip(ray_ranks, plan.ranks_on(node), strict=True):
            rank_of_ray_rank[ray_rank] = rank
    return Placement(plan, sites, tuple(rank_of_ray_rank))


def format_placement(record: Mapping) -> str:
    """The aligned table of a `Placement.to_dict()` record (rank 0 prints it at start)."""
    layout = record["layout"]
    nodes = record["nodes"]
    index = {node["node_id"]: i for i, node in enumerate(nodes)}
    header = ("rank", "ray rank", "node", "node ip", "pp", "dp", "ep")
    rows = [
        (
            r["rank"],
            r["ray_rank"],
            index[r["node_id"]],
            r["node_ip"],
            r["pp_rank"],
            r["dp_rank"],
            r["ep_rank"],
        )
        for r in record["ranks"]
    ]
    columns = list(zip(header, *rows, strict=True))
    widths = [max(len(str(x)) for x in column) for column in columns]
    text = [isinstance(column[-1], str) for column in columns]  # text left, numbers right

    def line(cells) -> str:
        padded = (
            str(c).ljust(w) if left else str(c).rjust(w)
            for c, w, left in zip(cells, widths, text, strict=True)
        )
        return "  ".join(padded).rstrip()

    spans = [g["nodes"] for g in record["ep_groups"]]
    order = "ranks renumbered from Ray Train's order" if record["remapped"] else "Ray Train's rank order"
    out = [
        (
            f"placement: {len(rows)} ranks (pp={layout['pp']} dp={layout['dp']} ep={layout['ep']}) on "
            f"{len(nodes)} node(s), {order}"
        ),
        line(header),
        *(line(row) for row in rows),
    ]
    id_width = max(len(n["node_id"]) for n in nodes)
    for i, node in enumerate(nodes):
        ranks = " ".join(str(r) for r in node["ranks"])
        out.append(f"node {i}: {node['node_id'].ljust(id_width)}  {node['node_ip']}  ranks {ranks}")
    out.append(
        f"EP groups: {len(spans)}, nodes per group {max(spans)} at most; pipeline links across nodes: "
        f"{record['pipeline_links_across_nodes']} of {record['pipeline_links']}"
    )
    return "\n".join(out)


def write_placement(run_dir: str, record: Mapping) -> None:
    from moeforge.platform.outputs.storage import open_storage

    open_storage(run_dir).write_text(PLACEMENT_FILE, json.dumps(record, indent=2) + "\n")


def clear_placement(run_dir: str) -> None:
    """Remove an earlier launch's placement.json (best effort)."""
    from moeforge.platform.outputs.storage import open_storage

    try:
        storage = open_storage(run_dir)
        if storage.exists(PLACEMENT_FILE):
            storage.delete(PLACEMENT_FILE)
    except Exception as err:  # noqa: BLE001 -- never fail a launch over a stale record
        print(f"could not remove {run_dir}/{PLACEMENT_FILE} of an earlier launch: {err}")


def read_placement(run_dir: str) -> dict | None:
    """placement.json of a run, or None when it has none (or it cannot be read)."""
    from moeforge.platform.outputs.storage import open_storage

    try:
        storage = open_storage(run_dir)
        if not storage.exists(PLACEMENT_FILE):
            return None
        return json.loads(storage.read_text(PLACEMENT_FILE))
    except Exception:  # noqa: BLE001 -- a missing record only costs the rank translation
        return None


# ---- in each worker ------------------------------------------------------------------------------
_CURRENT: Placement | None = None


def current_placement() -> Placement | None:
    """This worker process's realized placement (set by `place_workers`), or None outside a run."""
    return _CURRENT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def this_site(ray_rank: int) -> WorkerSite:
    import ray

    return WorkerSite(
        ray_rank, ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), _free_port()
    )


def place_workers(topo: Topology, ray_rank: int, timeout_s: float) -> Placement:
    """Collective over Ray Train's default process group: every worker shares its site, all compute
    the same `match_plan`, and when the plan renumbers any worker the default group is made again
    with the planned ranks (Ray Train's group is destroyed first; `timeout_s` as its own). Returns
    the placement; this worker's world rank is `placement.rank_of_ray_rank[ray_rank]`."""
    global _CURRENT
    import torch.distributed as dist

    mine = this_site(ray_rank)
    if dist.is_initialized() and dist.get_world_size() > 1:
        sites: list[WorkerSite | None] = [None] * dist.get_world_size()
        dist.all_gather_object(sites, mine)
    else:
        sites = [mine]
    placement = match_plan(topo, sites)
    if placement.remapped:
        master = placement.site_of_rank(0)
        _regroup(placement.rank_of_ray_rank[ray_rank], topo.world_size, master, timeout_s)
    _CURRENT = placement
    return placement


def _regroup(rank: int, world_size: int, master: WorkerSite, timeout_s: float) -> None:
    """Make the default process group again with `rank` (same backend), its store served by the
    new rank 0 on the port it reported free."""
    import torch.distributed as dist

    backend = dist.get_backend()
    dist.destroy_process_group()
    host = f"[{master.node_ip}]" if ":" in master.node_ip else master.node_ip
    # Ray Train's TorchConfig set these for its own numbering; libraries that read them see ours.
    os.environ.update(RANK=str(rank), MASTER_ADDR=master.node_ip, MASTER_PORT=str(master.free_port))
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{host}:{master.free_port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


# ---- in the driver: waiting for the cluster ---------------------------------------------------------
# Ray Train's own limit on one worker-group start (its placement group becoming ready); it reads it
# from the environment and hands it from the driver to its controller (Ray Train v2's
# ENV_VARS_TO_PROPAGATE). Past it the controller fails the start, and retries it for ever unless
# FailureConfig.controller_failure_limit says otherwise (launch.py sets 0).
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


@contextlib.contextmanager
def workers_wait_at_most(wait_s: float):
    """Within the block, a Ray Train worker-group start waits at most `wait_s` for its resources
    (`cluster.wait_s`): its placement group's pending demand is what makes an autoscaler add nodes,
    and the nodes it adds go to that same group. The driver's environment is restored after."""
    saved = os.environ.get(START_TIMEOUT_ENV)
    os.environ[START_TIMEOUT_ENV] = repr(float(wait_s))
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(START_TIMEOUT_ENV, None)
        else:
            os.environ[START_TIMEOUT_ENV] = saved


def note_wait(parallel, cluster, log=print) -> bool:
    """Say so (one line) when the cluster has too little free right now for the run's workers, so a
    launch that waits for an autoscaler or for other jobs is not silent. Returns whether it said so."""
    import ray
    from moeforge.platform.runtime.cluster_check import worker_bundle

    free = ray.available_resources()
    bundle = {k: v for k, v in worker_bundle(parallel).items() if v > 0}
    if all(parallel.world_size * v <= free.get(k, 0.0) + 1e-9 for k, v in bundle.items()):
        return False
    log(
        f"waiting up to {cluster.wait_s:g}s (cluster.wait_s) for the cluster to host "
        f"{parallel.world_size} workers of {_bundle_text(bundle)} ({cluster.placement_strategy})"
    )
    return True


def is_start_timeout(err: BaseException) -> bool:
    """Whether Ray Train failed the run because its worker group did not start in time (a
    ControllerError around WorkerGroupStartupTimeoutError; matched by name, the class is internal)."""
    failure = getattr(err, "controller_failure", None)
    return type(failure).__name__ == "WorkerGroupStartupTimeoutError"


def wait_error(parallel, cluster) -> ConfigError:
    """The error of a run whose workers found no room within `cluster.wait_s`: what it asked for and
    what the cluster has now (totals and free), in cluster_check's words."""
    import ray
    from moeforge.platform.runtime.cluster_check import describe_shortfall

    return ConfigError(
        f"cluster.wait_s: the cluster could not host the run's {parallel.world_size} workers within "
        f"{cluster.wait_s:g}s: "
        + describe_shortfall(parallel, ray.cluster_resources(), ray.available_resources())
        + f" (placement strategy {cluster.placement_strategy}); use a larger or autoscaling cluster, "
        "fewer workers or smaller parallel.*_per_worker / parallel.worker_resources, or a longer "
        "cluster.wait_s"
    )


def _bundle_text(bundle: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle.items()) + "}"
