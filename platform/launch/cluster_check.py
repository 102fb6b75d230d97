"""Refuse a run that the cluster or machine cannot host, before any worker starts or model is built.

Two checks, both pure arithmetic on numbers handed in, so they cost nothing and are testable:

* `check_cluster_fits(parallel, res, totals)`: a pipeline run needs pp x dp workers, each with
  `resources.gpus_per_worker` GPUs, `resources.cpus_per_worker` CPUs and the custom resources of
  `resources.worker_resources` (`worker_bundle`). `totals` is what the cluster has in total, as
  `ray.cluster_resources()` reports it. Called by platform.launch.ray_train right after it connects
  to Ray; a 2,048-GPU DeepSeek-V3 run on a small cluster fails there with both numbers
  instead of waiting forever for workers that can never be placed.
* `check_single_process_fits(model, res, machine)`: the one-process reference loop holds the
  whole training state in one place, GPU memory when `resources.gpus_per_worker > 0`, RAM otherwise.
  The state is `accounting.estimate(model).train_state_bytes` (16 bytes per parameter); activations
  come on top, so passing this check is necessary, not sufficient.

`describe_shortfall` says the same for a run that waited `cluster.wait_s` in vain
(`platform.launch.cluster_wait.wait_error`). `machine_resources()` measures this machine in
the same vocabulary (CPU, GPU, memory, gpu_memory).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

from moeforge.model.config import ModelConfig
from moeforge.platform.config.builder import ConfigError
from moeforge.platform.config.parallel import ParallelConfig
from moeforge.platform.config.resources import ResourcesConfig
from moeforge.platform.plan.accounting import TRAIN_STATE_BYTES_PER_PARAM, estimate

GB = 1e9
_EPS = 1e-9  # fractional resources (0.5 GPU per worker) add up with float rounding


def worker_bundle(res: ResourcesConfig) -> dict[str, float]:
    """The Ray resources one worker of the run asks for: `resources.cpus_per_worker` CPUs,
    `resources.gpus_per_worker` GPUs (when any) and `resources.worker_resources`. Ray Train's
    `resources_per_worker` (one placement-group bundle per worker)."""
    bundle = {"CPU": float(res.cpus_per_worker)}
    if res.gpus_per_worker > 0:
        bundle["GPU"] = float(res.gpus_per_worker)
    bundle.update({name: float(v) for name, v in res.worker_resources.items()})
    return bundle


def _demands(res: ResourcesConfig):
    """(resource, per worker, the field that sets it) for every resource a worker needs; GPU and
    CPU always (GPU first: the scarce one), custom resources after them."""
    yield "GPU", res.gpus_per_worker, "resources.gpus_per_worker"
    yield "CPU", res.cpus_per_worker, "resources.cpus_per_worker"
    for name, amount in res.worker_resources.items():
        yield name, amount, f"resources.worker_resources.{name}"


def _unit(kind: str) -> str:
    return f"{kind}s" if kind in ("CPU", "GPU") else kind


def _layout(parallel_cfg: ParallelConfig) -> str:
    return f"pp={parallel_cfg.pp} x dp={parallel_cfg.dp} = {parallel_cfg.world_size} workers"


def check_cluster_fits(parallel_cfg: ParallelConfig, res: ResourcesConfig, totals: Mapping[str, float]) -> None:
    """Raise ConfigError when the cluster's total GPUs, CPUs or custom worker resources
    (`resources.worker_resources`) cannot hold pp x dp workers.

    `totals`: what `ray.cluster_resources()` returns ({"CPU": 64.0, "GPU": 8.0, ...}); a missing
    key counts as 0. With `resources.wait_for_autoscaler` the cluster may still grow, so nothing is
    refused (the launch then waits at most `cluster.wait_s` for it)."""
    if res.wait_for_autoscaler:
        return
    workers = parallel_cfg.world_size
    for kind, per_worker, field in _demands(res):
        needed = workers * per_worker
        have = float(totals.get(kind, 0.0))
        if needed > have + _EPS:
            raise ConfigError(
                f"parallel: the run needs {needed:g} {_unit(kind)} ({_layout(parallel_cfg)} x "
                f"{per_worker:g} {kind}, {field}), the cluster has {have:g}; use a larger cluster, "
                f"fewer workers, or resources.wait_for_autoscaler=true on an autoscaling cluster"
            )


def describe_shortfall(
    parallel_cfg: ParallelConfig, res: ResourcesConfig, totals: Mapping[str, float], available: Mapping[str, float]
) -> str:
    """What the run asks for against what the cluster has, in `check_cluster_fits`'s words: "the
    run needs 4 CPUs (pp=2 x dp=2 = 4 workers x 1 CPU, resources.cpus_per_worker), the cluster has
    8 (2 free); ..." for every resource a worker needs (GPUs only when it needs any). `totals`
    and `available`: `ray.cluster_resources()` and `ray.available_resources()`."""
    parts = []
    for kind, per_worker, field in _demands(res):
        if kind == "GPU" and per_worker == 0:
            continue
        have, free = float(totals.get(kind, 0.0)), float(available.get(kind, 0.0))
        parts.append(
            f"{parallel_cfg.world_size * per_worker:g} {_unit(kind)} ({_layout(parallel_cfg)} x "
            f"{per_worker:g} {kind}, {field}), the cluster has {have:g} ({free:g} free)"
        )
    return "the run needs " + "; ".join(parts)


def check_single_process_fits(model_cfg: ModelConfig, res: ResourcesConfig, machine: Mapping[str, float]) -> None:
    """Raise ConfigError when a one-process run cannot start here: too few GPUs, or a training
    state larger than the memory it would live in. `machine`: see `machine_resources()`."""
    gpus_needed = math.ceil(res.gpus_per_worker)
    gpus = int(machine.get("GPU", 0))
    if gpus_needed > gpus:
        raise ConfigError(
            f"resources.gpus_per_worker: the run needs {gpus_needed} GPU(s), this machine has {gpus}"
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
