"""How a run meets its Ray cluster: how long it waits for the workers' resources, and how Ray
packs the workers onto nodes (`platform.launch.cluster_wait` and `platform.launch.rank_placement.place_workers` say what
happens after)."""

from __future__ import annotations

from dataclasses import dataclass

from moeforge.platform.config.builder import require

# Ray placement-group strategies for the one bundle per worker that Ray Train reserves. PACK puts the
# workers on as few nodes as fit, which keeps an EP group's all-to-all inside a node when it can.
PLACEMENT_STRATEGIES = ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD")


@dataclass
class RayClusterConfig:
    """The `cluster` section of a training run (not moeforge-estimate's cluster, the hardware a cost
    estimate assumes: platform.plan.accounting.ClusterConfig).

    `wait_s`: how long a run waits for the cluster to host all its workers (an autoscaler adding
    nodes, or other jobs releasing them) before it fails with what it asked for and what the cluster
    has. `placement_strategy`: Ray's strategy for the workers' placement group."""

    wait_s: float = 600.0
    placement_strategy: str = "PACK"

    def __post_init__(self) -> None:
        require(self.wait_s > 0, "wait_s", f"must be positive (seconds), got {self.wait_s}")
        require(
            self.placement_strategy in PLACEMENT_STRATEGIES,
            "placement_strategy",
            f"must be one of {PLACEMENT_STRATEGIES}, got {self.placement_strategy!r}",
        )
