"""Realizing the placement plan in the workers: which world rank each Ray Train worker becomes.

The plan itself (pure) is `platform.launch.rank_placement_plan.plan_placement`; waiting for the
cluster's nodes is `platform.launch.cluster_wait`.

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
printed by rank 0 as one table and saved as `placement.json` in run.dir. `current_placement()` holds
it in the worker process: expert placement (`platform.moe.expert_placement.expert_placement`) takes its
node ids from it, so node-limited routing and the nodes-per-token statistics follow this mapping.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from moeforge.platform.engine.topology import Topology
from moeforge.platform.launch.rank_placement_plan import PlacementPlan, plan_placement

PLACEMENT_FILE = "placement.json"


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
