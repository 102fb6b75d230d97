"""How the run is split across workers: pipeline schedule, data and expert parallelism, ZeRO, overlap.

What each worker asks of the cluster is `resources` (`ResourcesConfig`); test-only hooks are `debug`."""

from __future__ import annotations

from dataclasses import dataclass

from moeforge.platform.config.builder import require

SCHEDULES = ("single", "1f1b", "zb1p", "dualpipe", "dualpipev")
# ZeRO's reduce and all-gather bucket, in elements: 5e7 (200 MB of fp32), Megatron-DeepSpeed's
# practice; DeepSpeed's own 5e8 commits 2 GB per bucket on a GPU (`platform.optim.zero_step.deepspeed_config`).
ZERO_BUCKET_ELEMENTS = 50_000_000
OVERLAP_ORDERS = ("backward_first", "forward_first")  # whose phase opens an overlapped F&B pair


@dataclass
class ParallelConfig:
    """`schedule=single` is the one-process reference loop (pp = dp = 1)."""

    schedule: str = "single"
    pp: int = 1
    dp: int = 1
    microbatches: int = 1
    zero_stage: int = 1
    # Elements in each of ZeRO's reduce and all-gather buckets (DeepSpeed's reduce_bucket_size and
    # allgather_bucket_size); even, as DeepSpeed aligns all-gather shards to 2 elements.
    zero_bucket_elements: int = ZERO_BUCKET_ELEMENTS
    backend: str = "auto"  # auto: nccl when the workers have GPUs, else gloo
    p2p_timeout_s: float = 120.0  # a peer that never sends fails the run after this long
    layers_per_stage: list[int] | None = None  # explicit uneven split, one count per model stage
    # Expert parallelism: the routed experts of every MoE layer are sharded over `ep` data-parallel
    # replicas of the same stage(s) (platform/moe). Must divide dp and model.n_routed_experts.
    ep: int = 1
    # Ranks of an EP group per node, for node-limited routing and its statistics. 0: from where Ray
    # placed the workers (node ids); a test sets it to pretend several nodes on one machine.
    ep_ranks_per_node: int = 0
    # Run stage chunks as phase programs split at the MoE all-to-alls (`platform.engine.chunk_program`)
    # instead of one autograd graph each; `overlap` then interleaves the two halves of every F&B
    # pair phase by phase (DualPipe's overlap). Same math either way: on and off are bit-identical.
    chunk_phases: bool = False
    overlap: bool = False
    # Whose phase opens an overlapped pair (engine/chunk_program.run_pair): backward_first hides a
    # short closing phase's transfer (measured by moeforge-bench overlap); forward_first the other.
    overlap_order: str = "backward_first"
    recv_lookahead: int = 2  # receives are posted this many compute actions ahead of need
    # SMs the persistent FP8 GEMMs leave to communication kernels (NCCL's all-to-alls and transfers
    # of an overlapped pair run beside them); DeepSeek-V3 left 20 of 132. 0: every SM computes.
    comm_sms: int = 0

    def __post_init__(self) -> None:
        require(self.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}, got {self.schedule!r}")
        require(self.pp >= 1, "pp", f"must be >= 1, got {self.pp}")
        require(self.dp >= 1, "dp", f"must be >= 1, got {self.dp}")
        require(self.microbatches >= 1, "microbatches", f"must be >= 1, got {self.microbatches}")
        require(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"must be 0..3, got {self.zero_stage}")
        require(
            self.backend in ("auto", "gloo", "nccl"),
            "backend",
            f"must be auto|gloo|nccl, got {self.backend!r}",
        )
        require(
            self.zero_bucket_elements > 0 and self.zero_bucket_elements % 2 == 0,
            "zero_bucket_elements",
            f"must be a positive even number of elements, got {self.zero_bucket_elements}",
        )
        require(self.p2p_timeout_s > 0, "p2p_timeout_s", "must be positive")
        if self.layers_per_stage is not None:
            self.layers_per_stage = list(self.layers_per_stage)
            require(
                all(isinstance(c, int) and c >= 0 for c in self.layers_per_stage),
                "layers_per_stage",
                f"must be a list of integers >= 0, got {self.layers_per_stage}",
            )
        require(self.ep >= 1 and self.dp % self.ep == 0, "ep", f"must divide dp={self.dp}, got {self.ep}")
        require(
            self.ep_ranks_per_node >= 0, "ep_ranks_per_node", f"must be >= 0, got {self.ep_ranks_per_node}"
        )
        if self.ep_ranks_per_node:
            require(
                self.ep % self.ep_ranks_per_node == 0,
                "ep_ranks_per_node",
                f"must divide ep={self.ep}, got {self.ep_ranks_per_node}",
            )
        require(
            self.chunk_phases or not self.overlap,
            "overlap",
            "interleaves phase programs: set parallel.chunk_phases=true too",
        )
        require(
            self.overlap_order in OVERLAP_ORDERS,
            "overlap_order",
            f"must be backward_first|forward_first, got {self.overlap_order!r}",
        )
        require(self.recv_lookahead >= 1, "recv_lookahead", f"must be >= 1, got {self.recv_lookahead}")
        require(self.comm_sms >= 0, "comm_sms", f"must be >= 0, got {self.comm_sms}")
        if self.schedule == "single":
            require(
                self.pp == 1 and self.dp == 1,
                "pp",
                "schedule=single runs in one process: pp and dp must be 1",
            )
        if self.zero_stage == 3:
            require(
                self.pp == 1,
                "zero_stage",
                "ZeRO-3 shards parameters, which pipeline stages (pp > 1) cannot use",
            )

    @property
    def world_size(self) -> int:
        return self.pp * self.dp
