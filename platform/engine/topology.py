"""Where every world rank sits in the pipeline x data-parallel grid, and which ranks talk to which.

Layout: `world_rank = dp_rank * pp + pp_rank`, so the pp ranks of one pipeline replica are
consecutive (Ray Train places consecutive ranks together when it can, keeping the chatty
point-to-point traffic local) and the dp replicas of a stage are `pp` apart.

Groups, all derived from (schedule layout, pp, dp) alone so every rank computes the same lists:

- pipeline group: the pp ranks of one dp replica (listed for completeness and for collectives
  along the pipeline; activations and gradients travel over the links below).
- dp group: the dp ranks holding the same pp position.
- shard group: every rank holding this rank's parameters. For DualPipe rank r holds stages r and
  pp-1-r and so does rank pp-1-r: the two ranks have identical parameter sets, so the shard group is
  {r, pp-1-r} x dp. Gradients are reduced and ZeRO partitions optimizer state over this group.
  Otherwise it is the dp group.
- norm group: one member of every distinct shard group, used to add up per-shard squared gradient
  norms into the global norm without counting a DualPipe pair twice. For DualPipe: the ranks of one
  dp replica on the same "side" (pp_rank < pp/2, or >= pp/2); otherwise the pipeline group.
- tie group: ranks holding a copy of the embedding that is NOT the same Parameter on one rank:
  with MTP the last stage needs the embedding; when the first and last stages live on different
  ranks (1F1B, ZB1P) their copies' gradients are summed over {first-stage rank, last-stage rank} of
  each dp replica. DualPipe and DualPipeV put both ends on the same ranks, so no tie group exists.
- ep group: ranks of one dp group split into blocks of `ep` consecutive dp replicas: the ranks
  whose MoE layers exchange tokens (`platform.moe`). A rank's EP rank is its position in the block,
  dp_rank % ep, and decides which experts it holds.
- expert shard group: every rank holding this rank's routed experts (the expert-data-parallel
  group): the shard group's members with the same EP rank, size shard/ep. Expert gradients are
  reduced, and ZeRO partitions their optimizer state, over it. With ep = 1 it is the shard group.
- ep counts group: the EP group's members again, as a second process group that carries only the
  MoE layers' token counts. Under NCCL all collectives of one group share one stream, so a count
  exchange on the EP group would queue behind the other micro-batch's bulk all-to-all in an
  overlapped F&B pair.
- links: one two-rank group per DIRECTION between pipeline neighbours of a dp replica, carrying
  only that direction's sends. NCCL runs the ungrouped point-to-point ops of one (group, pair) in
  posting order on one stream, and a posted receive blocks that stream until its data arrives: on
  one group, two neighbours that each post a receive ahead (as the executor does, so transfers
  overlap compute) wait for each other forever. With a group per direction each stream holds
  sends on one side and receives on the other, and the executor posts both in action-list order,
  which the schedule validator checks agree (`platform.schedules.validate.validate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moeforge.platform.config.builder import ConfigError

# Which pipeline layout each schedule uses (see `platform.schedules.actions.Schedule.layout`).
LAYOUT_OF_SCHEDULE = {
    "single": "linear",
    "1f1b": "linear",
    "zb1p": "linear",
    "dualpipe": "bidirectional",
    "dualpipev": "v",
}


GROUP_KINDS = ("pipeline", "dp", "shard", "norm", "tie", "ep", "ep_counts", "expert_shard")


@dataclass(frozen=True)
class Topology:
    """The (pp, dp) grid of a run and the stage placement of its schedule layout."""

    pp: int
    dp: int
    layout: str = "linear"  # linear | bidirectional | v
    ep: int = 1
    tied_embedding: bool = False  # True when the last stage also needs the embedding (MTP)

    def __post_init__(self) -> None:
        if self.pp < 1 or self.dp < 1:
            raise ConfigError(f"parallel.pp and parallel.dp must be >= 1, got pp={self.pp} dp={self.dp}")
        if self.layout not in ("linear", "bidirectional", "v"):
            raise ConfigError(f"topology layout must be linear|bidirectional|v, got {self.layout!r}")
        if self.layout == "bidirectional" and self.pp % 2:
            raise ConfigError(f"parallel.pp: DualPipe needs an even number of pipeline ranks, got {self.pp}")
        if self.ep < 1 or self.dp % self.ep:
            raise ConfigError(f"parallel.ep: must divide parallel.dp={self.dp}, got {self.ep}")

    @classmethod
    def for_schedule(
        cls, schedule: str, pp: int, dp: int, ep: int = 1, tied_embedding: bool = False
    ) -> Topology:
        if schedule not in LAYOUT_OF_SCHEDULE:
            raise ConfigError(f"parallel.schedule: unknown schedule {schedule!r}")
        return cls(pp, dp, LAYOUT_OF_SCHEDULE[schedule], ep, tied_embedding)

    # ---- coordinates ------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.pp * self.dp

    @property
    def num_stages(self) -> int:
        return 2 * self.pp if self.layout == "v" else self.pp

    def coords(self, rank: int) -> tuple[int, int]:
        """world rank -> (pp_rank, dp_rank)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        return rank % self.pp, rank // self.pp

    def rank_of(self, pp_rank: int, dp_rank: int) -> int:
        return dp_rank * self.pp + pp_rank

    def stages_of(self, pp_rank: int) -> list[int]:
        """Model stages held by a pipeline rank, indexed by local chunk."""
        if self.layout == "linear":
            return [pp_rank]
        if self.layout == "bidirectional":
            return [pp_rank, self.pp - 1 - pp_rank]
        return [pp_rank, 2 * self.pp - 1 - pp_rank]

    def pp_rank_of_stage(self, stage: int) -> list[int]:
        """Pipeline ranks holding `stage` (two for DualPipe)."""
        return [r for r in range(self.pp) if stage in self.stages_of(r)]

    # ---- groups (lists of world ranks, sorted) ---------------------------------------------------
    def pipeline_group(self, rank: int) -> list[int]:
        _, d = self.coords(rank)
        return [self.rank_of(r, d) for r in range(self.pp)]

    def dp_group(self, rank: int) -> list[int]:
        p, _ = self.coords(rank)
        return [self.rank_of(p, d) for d in range(self.dp)]

    def shard_group(self, rank: int) -> list[int]:
        """Every rank holding exactly this rank's parameters (ZeRO and gradient reduction group)."""
        p, _ = self.coords(rank)
        pair = sorted({p, self.pp - 1 - p}) if self.layout == "bidirectional" else [p]
        return sorted(self.rank_of(q, d) for d in range(self.dp) for q in pair)

    def norm_group(self, rank: int) -> list[int]:
        """One rank per distinct shard group, in this rank's dp replica (see module docstring)."""
        p, d = self.coords(rank)
        if self.layout != "bidirectional":
            return self.pipeline_group(rank)
        side = [q for q in range(self.pp) if (q < self.pp // 2) == (p < self.pp // 2)]
        return [self.rank_of(q, d) for q in side]

    def tie_group(self, rank: int) -> list[int] | None:
        """Ranks whose embedding copies must have their gradients summed; None if this rank has none
        to share (no MTP, a middle stage, or both ends on this rank)."""
        if not self.tied_embedding or self.layout != "linear" or self.pp == 1:
            return None
        p, d = self.coords(rank)
        if p not in (0, self.pp - 1):
            return None
        return [self.rank_of(0, d), self.rank_of(self.pp - 1, d)]

    def ep_group(self, rank: int) -> list[int]:
        _, d = self.coords(rank)
        first = d - d % self.ep
        dp_ranks = self.dp_group(rank)
        return dp_ranks[first : first + self.ep]

    def ep_counts_group(self, rank: int) -> list[int]:
        return self.ep_group(rank)

    def ep_rank(self, rank: int) -> int:
        """Position in the EP group: which block of experts this rank holds."""
        return self.coords(rank)[1] % self.ep

    def expert_shard_group(self, rank: int) -> list[int]:
        """Every rank holding exactly this rank's routed experts (see module docstring)."""
        mine = self.ep_rank(rank)
        return [q for q in self.shard_group(rank) if self.ep_rank(q) == mine]

    def p2p_links(self) -> list[tuple[int, int]]:
        """Every directed (sender, receiver) pair of pipeline neighbours, in one fixed order. Every
        layout moves data between adjacent pipeline ranks only (DualPipe's second direction and the
        return leg of DualPipeV included; the V's turn is local)."""
        links = []
        for d in range(self.dp):
            for r in range(self.pp - 1):
                a, b = self.rank_of(r, d), self.rank_of(r + 1, d)
                links += [(a, b), (b, a)]
        return links

    def all_groups(self) -> dict[str, list[list[int]]]:
        """Every distinct group of every kind, in a fixed order (all ranks must create process groups
        in the same order)."""
        out: dict[str, list[list[int]]] = {}
        for kind in GROUP_KINDS:
            seen: list[list[int]] = []
            for rank in range(self.world_size):
                g = getattr(self, f"{kind}_group")(rank)
                if g is not None and g not in seen:
                    seen.append(g)
            out[kind] = seen
        return out


@dataclass
class ProcessGroups:
    """This rank's torch.distributed groups (None where a group has a single member or none), and
    its links: (sender, receiver) -> the group carrying that direction's transfers."""

    pipeline: object
    dp: object
    shard: object
    norm: object
    tie: object
    ep: object
    ep_counts: object
    expert_shard: object
    ranks: dict[str, list[int] | None]
    links: dict[tuple[int, int], object] = field(default_factory=dict)


def create_process_groups(topo: Topology, rank: int) -> ProcessGroups:
    """Create every group of `topo` (collective: all ranks call this in the same order) and return
    this rank's. Groups of one rank are still created (new_group must be called uniformly) but
    returned as-is; callers skip collectives on them."""
    import torch.distributed as dist

    mine: dict[str, object] = {}
    ranks: dict[str, list[int] | None] = {}
    for kind, groups in topo.all_groups().items():
        own = getattr(topo, f"{kind}_group")(rank)
        ranks[kind] = own
        mine[kind] = None
        for members in groups:
            handle = dist.new_group(members)
            if members == own:
                mine[kind] = handle
    return ProcessGroups(ranks=ranks, links=create_links(topo.p2p_links(), rank), **mine)


def create_links(p2p_links: list[tuple[int, int]], rank: int) -> dict[tuple[int, int], object]:
    """One process group per directed (sender, receiver) pair of `p2p_links` (collective over the
    world: every rank passes the same list); returns this rank's, by (sender, receiver)."""
    import torch.distributed as dist

    links = {}
    for sender, receiver in p2p_links:
        handle = dist.new_group(sorted((sender, receiver)))
        if rank in (sender, receiver):
            links[(sender, receiver)] = handle
    return links
