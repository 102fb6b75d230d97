"""Refuse a run that the cluster or machine cannot host, before any worker starts or model is built.

Two checks, both pure arithmetic on numbers handed in, so they cost nothing and are testable:

* `check_cluster_fits(parallel, resources)`: a pipeline run needs pp x dp workers, each with
  `parallel.gpus_per_worker` GPUs and `parallel.cpus_per_worker` CPUs. `resources` is what the
  cluster has in total, as `ray.cluster_resources()` reports it. Called by platform.runtime.launch right after
  it connects to Ray; a 2,048-GPU DeepSeek-V3 run on a small cluster fails there with both numbers
  instead of waiting forever for workers that can never be placed.
* `check_single_process_fits(model, parallel, machine)`: the one-process reference loop holds the
  whole training state in one place, GPU memory when `parallel.gpus_per_worker > 0`, RAM otherwise.
  The state is `accounting.estimate(model).train_state_bytes` (16 bytes per parameter); activations
  come on top, so passing this check is necessary, not sufficient.

`machine_resources()` measures this machine in the same vocabulary (CPU, GPU, memory, gpu_memory).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

from moeforge.model.accounting import TRAIN_STATE_BYTES_PER_PARAM, estimate
from moeforge.model.config import ConfigError, ModelConfig
from moeforge.platform.config.parallel import ParallelConfig

GB = 1e9
_EPS = 1e-9  # fractional resources (0.5 GPU per worker) add up with float rounding


def check_cluster_fits(parallel_cfg: ParallelConfig, resources: Mapping[str, float]) -> None:
    """Raise ConfigError when the cluster's total GPUs or CPUs cannot hold pp x dp workers.

    `resources`: totals such as `ray.cluster_resources()` returns ({"CPU": 64.0, "GPU": 8.0, ...});
    a missing key counts as 0. With `parallel.wait_for_autoscaler` the cluster may still grow, so
    nothing is refused."""
    if parallel_cfg.wait_for_autoscaler:
        return
    workers = parallel_cfg.world_size
    layout = f"pp={parallel_cfg.pp} x dp={parallel_cfg.dp} = {workers} workers"
    for kind, per_worker, field in (
        ("GPU", parallel_cfg.gpus_per_worker, "parallel.gpus_per_worker"),
        ("CPU", parallel_cfg.cpus_per_worker, "parallel.cpus_per_worker"),
    ):
        needed = workers * per_worker
        have = float(resources.get(kind, 0.0))
        if needed > have + _EPS:
            raise ConfigError(
                f"parallel: the run needs {needed:g} {kind}s ({layout} x {per_worker:g} {kind}, "
                f"{field}), the cluster has {have:g}; use a larger cluster, fewer workers, or "
                f"parallel.wait_for_autoscaler=true on an autoscaling cluster"
            )


def check_single_process_fits(
    model_cfg: ModelConfig, parallel_cfg: ParallelConfig, machine: Mapping[str, float]
) -> None:
    """Raise ConfigError when a one-process run cannot start here: too few GPUs, or a training
    state larger than the memory it would live in. `machine`: see `machine_resources()`."""
    gpus_needed = math.ceil(parallel_cfg.gpus_per_worker)
    gpus = int(machine.get("GPU", 0))
    if gpus_needed > gpus:
        raise ConfigError(
            f"parallel.gpus_per_worker: the run needs {gpus_needed} GPU(s), this machine has {gpus}"
        )
    est = estimate(model_cfg)
    params = est.total_params + est.mtp_params
    needed = est.train_state_bytes
    if gpus_needed:
        have, where = float(machine.get("gpu_memory", 0.0)), "memory of one GPU"
    else:
        have, where = float(machine.get("memory", 0.0)), "RAM"
    if needed > have:
        raise ConfigError(
            f"model: the training state needs {needed / GB:,.1f} GB ({params / 1e9:,.2f}B parameters x "
            f"{TRAIN_STATE_BYTES_PER_PARAM} bytes, activations not counted), more than this machine's "
            f"{have / GB:,.1f} GB of {where}; choose a smaller model or a pipeline schedule "
            f"(parallel=...) across workers"
        )


def machine_resources() -> dict[str, float]:
    """This machine: CPU count, GPU count, RAM bytes (the cgroup limit when lower) and the memory of
    its smallest GPU in bytes (0 without GPUs)."""
    import torch  # late: only the single-process path needs it, and torch is slow to import

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpu_memory = min((torch.cuda.get_device_properties(i).total_memory for i in range(gpus)), default=0)
    return {
        "CPU": float(os.cpu_count() or 1),
        "GPU": float(gpus),
        "memory": float(_ram_bytes()),
        "gpu_memory": float(gpu_memory),
    }


def _ram_bytes() -> int:
    """Physical RAM, or the container's cgroup memory limit when that is lower."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            ram = min(ram, int(text))
    return ram
