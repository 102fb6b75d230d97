"""What each worker asks of the cluster and what its hardware can do: Ray resources, the autoscaler
wait, and the hardware figures that the memory plan and MFU use."""

from __future__ import annotations

from dataclasses import dataclass, field

from moeforge.platform.config.builder import require


@dataclass
class ResourcesConfig:
    cpus_per_worker: float = 1.0  # Ray CPUs per worker, and its torch threads
    gpus_per_worker: float = 0.0  # 1 on a GPU cluster: NCCL and the Triton kernels
    # Further Ray resources every worker needs, e.g. {"moeforge_worker": 1} so that workers land only
    # on nodes that carry that custom resource (an autoscaler's worker node type). CPU and GPU are
    # cpus_per_worker and gpus_per_worker.
    worker_resources: dict[str, float] = field(default_factory=dict)
    # False: refuse at once a run larger than the cluster's totals; True: the cluster may still grow
    # (an autoscaler), so wait for it, at most cluster.wait_s
    wait_for_autoscaler: bool = False
    gpu_memory_gb: float = 0.0  # per worker, for the memory plan (moeforge-estimate); 0: unknown
    peak_tflops_per_worker: float = 0.0  # for MFU; 0: unknown hardware, no MFU reported

    def __post_init__(self) -> None:
        require(self.cpus_per_worker >= 0, "cpus_per_worker", "must be >= 0")
        require(self.gpus_per_worker >= 0, "gpus_per_worker", "must be >= 0")
        self.worker_resources = dict(self.worker_resources)
        for name, amount in self.worker_resources.items():
            require(
                isinstance(name, str) and bool(name) and name not in ("CPU", "GPU"),
                "worker_resources",
                f"names a custom Ray resource (CPU and GPU are cpus_per_worker and gpus_per_worker), got {name!r}",
            )
            require(amount > 0, f"worker_resources.{name}", f"must be positive, got {amount}")
        require(self.gpu_memory_gb >= 0, "gpu_memory_gb", f"must be >= 0, got {self.gpu_memory_gb}")
        require(self.peak_tflops_per_worker >= 0, "peak_tflops_per_worker", "must be >= 0")
