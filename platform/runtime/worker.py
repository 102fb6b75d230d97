"""The Ray Train worker loop: each worker is the actor that owns its pipeline stage(s).

Ray Train's TorchConfig has already joined the workers in one torch.distributed group (gloo on CPU,
NCCL on GPU) when `train_loop_per_worker` starts; the pipeline runtime builds its own groups from
the topology on top of it.
"""

from __future__ import annotations

import logging
import os
import sys


def _quiet_ray_train_report_log() -> None:
    """Ray Train logs every ray.train.report with its whole metrics dict at INFO, on every rank; the
    progress line on rank 0 already says the same. Its logger is named after its module's file."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: keep its logging as it is
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import torch
    from moeforge.platform.runtime.pipeline_run import run_pipeline_training
    from ray.train.torch import get_device

    _quiet_ray_train_report_log()
    cfg = config["cfg"]
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    threads = max(1, int(cfg.parallel.cpus_per_worker))
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    device = get_device() if cfg.parallel.gpus_per_worker > 0 else torch.device("cpu")

    def report(metrics: dict) -> None:
        # Every worker calls this at the same steps: ray.train.report is a barrier across workers.
        ray.train.report(metrics)

    def log(line: str) -> None:
        # Straight to stdout: Ray Train patches print() into a logger that some libraries also
        # echo, which printed every progress line twice.
        # Ray prefixes a worker's output with its pid; the pipeline rank is what a reader needs.
        sys.stdout.write(f"[rank {rank}] {line}\n")
        sys.stdout.flush()

    run_pipeline_training(cfg, rank, world_size, report=report, log=log, device=device)
