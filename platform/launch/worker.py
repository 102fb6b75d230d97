"""The Ray Train worker loop: each worker is the actor that owns its pipeline stage(s).

Ray Train's TorchConfig has already joined the workers in one torch.distributed group (gloo on CPU,
NCCL on GPU) when `train_loop_per_worker` starts. The workers then agree which world rank each
runs as (platform/launch/rank_placement.py: EP groups inside nodes first, then pipeline neighbours,
for the nodes Ray put them on; the group is made again when that renumbers Ray Train's ranks),
rank 0 prints the mapping and saves placement.json, and the pipeline runtime builds its own groups
from the topology on top of that group.

Before any of that, the worker fixes its device for moeforge and DeepSpeed alike
(platform/launch/accelerator.py): DeepSpeed's accelerator from the device, chosen before deepspeed
is first imported in this process, and on CUDA the current device and LOCAL_RANK set to the GPU Ray
Train assigned.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings

from moeforge.platform.outputs.log_filters import drop_log_message


def _quiet_ray_train_report_log() -> None:
    """Ray Train logs every ray.train.report with its whole metrics dict at INFO, on every rank; the
    progress line on rank 0 already says the same. Its logger is named after its module's file."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: keep its logging as it is
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _quiet_third_party_console() -> None:
    """Keep recurring library noise that says nothing about this run off the console, each at its
    source and no wider than the one message (everything else those libraries say still shows).

    - torch deprecates `all_gather_into_tensor`, which DeepSpeed's comm layer calls after every ZeRO
      step (not our code): a FutureWarning attributed to torch's c10d_logger wrapper, printed anew at
      every log step (Python shows a warning again once anything has changed the warning filters,
      as `warnings.catch_warnings` blocks in other libraries do).
    - DeepSpeed warns on rank 0 that ZeRO runs "an untested optimizer": moeforge opted in with
      `zero_allow_untested_optimizer` (its AdamW matched a one-process reference, FACTS.md).
    - DeepSpeed announces its CPU shared-memory comm op ("DeepSpeed deepspeed.ops.comm.
      deepspeed_shm_comm_op built successfully") when it creates its comm backend, with a bare
      print(): no logger, so no level to set. Ray Train patches print() in its workers into a record
      on the root logger (at the caller's file), dropped here by file and text, plus a copy to
      sys.stdout, which `_init_deepspeed_comm` redirects for that one call.
    """
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
        category=FutureWarning,
        module=r"torch\.distributed\.c10d_logger",
    )
    # "DeepSpeed" is deepspeed.utils.logger's name; a filter set before deepspeed creates it stays.
    drop_log_message("DeepSpeed", "**** You are using ZeRO with an untested optimizer")
    drop_log_message("", "DeepSpeed deepspeed.ops.comm.", source="deepspeed/comm/")


def _init_deepspeed_comm() -> None:
    """Create DeepSpeed's communication backend over the process group Ray Train set up, once, with
    stdout redirected for this call only (see `_quiet_third_party_console`); `deepspeed.initialize`
    finds it and does not create another. A failure still raises."""
    from deepspeed import comm as ds_comm
    from deepspeed.accelerator import get_accelerator

    if ds_comm.is_initialized():
        return
    with contextlib.redirect_stdout(io.StringIO()):
        ds_comm.init_distributed(
            dist_backend=get_accelerator().communication_backend_name(), dist_init_required=False
        )


def _bind_worker_device(parallel_cfg):
    """This worker's training device, made DeepSpeed's too: Ray Train's GPU when the run asks for
    GPUs (parallel.gpus_per_worker), else the CPU. With ZeRO (DeepSpeed), DS_ACCELERATOR is set from
    it; call this before anything imports deepspeed. Returns the device."""
    import torch
    from moeforge.platform.launch.accelerator import bind_device, use_accelerator_for

    if parallel_cfg.gpus_per_worker > 0:
        from ray.train.torch import get_device

        device = get_device()
    else:
        device = torch.device("cpu")
    device = bind_device(device)
    if parallel_cfg.zero_stage > 0:  # ZeRO runs on DeepSpeed
        use_accelerator_for(device)
    return device


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import torch
    from moeforge.platform.engine.topology import Topology
    from moeforge.platform.launch.rank_placement import format_placement, place_workers, write_placement
    from moeforge.platform.train.trainer import Trainer

    _quiet_ray_train_report_log()
    _quiet_third_party_console()
    cfg = config["cfg"]
    ctx = ray.train.get_context()
    par = cfg.parallel
    # First: the placement's collectives run on the current CUDA device, and nothing may import
    # deepspeed before its accelerator is chosen.
    device = _bind_worker_device(par)
    if config.get("record_comm"):  # before DeepSpeed's comm backend keeps references to torch's calls
        from moeforge.platform.engine.comm_record import start_recording

        start_recording(config["record_comm"])
    if config.get("dump_grads"):  # the driver's MOEFORGE_DUMP_GRADS (platform/outputs/grad_dump.py)
        from moeforge.platform.outputs.grad_dump import GRAD_DUMP_ENV

        os.environ[GRAD_DUMP_ENV] = config["dump_grads"]
    topo = Topology.for_schedule(par.schedule, par.pp, par.dp, par.ep, cfg.model.num_nextn_predict_layers > 0)
    # This worker's world rank is the placement's, which is Ray Train's own unless the plan
    # renumbered the workers (then the default process group was made again with it).
    placement = place_workers(topo, ctx.get_world_rank(), float(config.get("dist_timeout_s", 1800)))
    rank, world_size = placement.rank_of_ray_rank[ctx.get_world_rank()], ctx.get_world_size()
    threads = max(1, int(cfg.parallel.cpus_per_worker))
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    if cfg.parallel.zero_stage > 0:  # ZeRO runs on DeepSpeed
        _init_deepspeed_comm()

    def report(metrics: dict) -> None:
        # Every worker calls this at the same steps: ray.train.report is a barrier across workers.
        ray.train.report(metrics)

    def log(line: str) -> None:
        # Straight to stdout: Ray Train patches print() into a logger that some libraries also
        # echo, which printed every progress line twice.
        # Ray prefixes a worker's output with its pid; the pipeline rank is what a reader needs.
        sys.stdout.write(f"[rank {rank}] {line}\n")
        sys.stdout.flush()

    if rank == 0:
        record = placement.to_dict()
        for line in format_placement(record).splitlines():
            log(line)
        write_placement(cfg.run.dir, record)

    restarted = bool(config.get("restarted_resumes", False))
    Trainer.pipeline_rank(cfg, rank, world_size, log=log, report_to=report, restarted=restarted, device=device).train()
