"""How the run is split across workers: pipeline schedule, data parallelism, ZeRO, resources."""

from __future__ import annotations

from dataclasses import dataclass

from moeforge.platform.config._build import require

SCHEDULES = ("single", "1f1b", "zb1p", "dualpipe", "dualpipev")


@dataclass
class ParallelConfig:
    """`schedule=single` is the one-process reference loop (pp = dp = 1)."""

    schedule: str = "single"
    pp: int = 1
    dp: int = 1
    microbatches: int = 1
    zero_stage: int = 1
    backend: str = "auto"  # auto: nccl when the workers have GPUs, else gloo
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    p2p_timeout_s: float = 120.0  # a peer that never sends fails the run after this long
    wait_for_autoscaler: bool = False  # False: fail early when the cluster is too small

    def __post_init__(self) -> None:
        require(self.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}, got {self.schedule!r}")
        require(self.pp >= 1, "pp", f"must be >= 1, got {self.pp}")
        require(self.dp >= 1, "dp", f"must be >= 1, got {self.dp}")
        require(self.microbatches >= 1, "microbatches", f"must be >= 1, got {self.microbatches}")
        require(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"must be 0..3, got {self.zero_stage}")
        require(self.backend in ("auto", "gloo", "nccl"), "backend", f"must be auto|gloo|nccl, got {self.backend!r}")
        require(self.cpus_per_worker >= 0, "cpus_per_worker", "must be >= 0")
        require(self.gpus_per_worker >= 0, "gpus_per_worker", "must be >= 0")
        require(self.p2p_timeout_s > 0, "p2p_timeout_s", "must be positive")
        if self.schedule == "single":
            require(self.pp == 1 and self.dp == 1, "pp", "schedule=single runs in one process: pp and dp must be 1")
        if self.zero_stage == 3:
            require(self.pp == 1, "zero_stage", "ZeRO-3 shards parameters, which pipeline stages (pp > 1) cannot use")

    @property
    def world_size(self) -> int:
        return self.pp * self.dp
