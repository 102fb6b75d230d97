"""`moeforge-train` for pipeline schedules: validate everything, then run Ray Train workers.

`launch_training(cfg, raw_config)`:
  1. validates the whole run before any worker starts (`validate_pipeline`): the schedule generator
     accepts (pp, micro-batches) and its training and evaluation lists pass the validator (NCCL's
     per-direction order included; built here in the driver, so a ScheduleError surfaces now), the
     layers split into the stages the schedule needs, ZeRO stage vs pp, the topology (DualPipe needs
     an even pp, ep divides dp);
  2. connects to Ray (`ray_connection.connect_ray`): the running session if `ray.is_initialized()`
     (tests), the cluster of RAY_ADDRESS / `ray job submit` (refused in one line when it does not
     answer), else a fresh local one (`address="local"`);
  3. refuses a run the cluster cannot host (`cluster_check.check_cluster_fits` on
     `ray.cluster_resources()`), unless `resources.wait_for_autoscaler`; a run that has to wait
     for room (an autoscaler adding nodes for the pending demand, other jobs finishing) says so
     and waits at most `cluster.wait_s` (`cluster_wait.workers_wait_at_most`), then fails naming
     what it asked for and what the cluster has (a ConfigError, `cluster.wait_s: ...`);
  4. runs a Ray Train `TorchTrainer` with pp x dp workers (one bundle each, `cluster.placement_strategy`);
     every worker is the actor owning its pipeline stage(s) (`train_loop_per_worker`). The
     workers first agree which world rank runs where (`rank_placement.place_workers`: EP groups
     inside nodes first, then pipeline neighbours); rank 0 prints the mapping and saves it as
     <run.dir>/placement.json. A worker that dies (a lost node, SIGKILL, an
     exception) makes Ray Train restart the whole group, up to checkpoint.max_failures times
     (`FailureConfig`); the new group resumes from the newest complete checkpoint, recomputing the
     steps after it (metrics.jsonl drops the records past it). Past the budget the run ends with
     every failed rank's error;
  5. returns rank 0's summary (also in <run.dir>/summary.json; rank 0 printed its closing line). A failed run's
     summary.json says status "failed" with the error naming every failed rank (root cause first),
     over what rank 0 recorded before it stopped.

Inside each worker (`train_loop_per_worker`): Ray Train's TorchConfig has already joined the
workers in one torch.distributed group (gloo on CPU, NCCL on GPU). The worker first fixes its device
for moeforge and DeepSpeed alike (`accelerator.bind_device`: DeepSpeed's accelerator from the
device, chosen before deepspeed is first imported in this process; on CUDA the current device and
LOCAL_RANK set to the GPU Ray Train assigned). The workers then agree which world rank each runs as
(the group is made again when the placement renumbers Ray Train's ranks), rank 0 prints the mapping
and saves placement.json, and `Trainer.pipeline_rank` builds the rank's groups from the topology on
top of that group and trains.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import sys
import warnings

from moeforge.platform.config.builder import ConfigError
from moeforge.platform.config.train import TrainConfig
from moeforge.platform.engine.comm_record import RECORD_ENV
from moeforge.platform.engine.stages import split_layers
from moeforge.platform.engine.topology import Topology
from moeforge.platform.launch.accelerator import ACCELERATOR_ENV, AcceleratorError, use_accelerator_for
from moeforge.platform.launch.ray_connection import connect_ray
from moeforge.platform.outputs.grad_dump import GRAD_DUMP_ENV
from moeforge.platform.outputs.log_filters import drop_log_message
from moeforge.platform.schedules import Schedule, ScheduleError, build_schedule, forward_only, validate


class PipelineRunError(RuntimeError):
    """A pipeline run failed on one or more ranks; the message names them."""


def validate_pipeline(cfg: TrainConfig) -> Schedule:
    """Every check that needs no cluster; raises ConfigError naming the field. Returns the schedule."""
    par = cfg.parallel
    if par.schedule == "single":
        raise ConfigError(
            "parallel.schedule: 'single' is the one-process loop; it does not launch Ray workers"
        )
    Topology.for_schedule(par.schedule, par.pp, par.dp, par.ep, cfg.model.num_nextn_predict_layers > 0)
    try:
        schedule = build_schedule(par.schedule, par.pp, par.microbatches)
        validate(schedule)
        validate(forward_only(schedule))
    except ScheduleError as err:
        msg = str(err)
        raise ConfigError(msg if msg.startswith("parallel.") else f"parallel.{msg}") from None
    split_layers(cfg.model.num_hidden_layers, schedule.num_stages, par.layers_per_stage)
    if par.zero_stage == 3 and par.pp > 1:
        raise ConfigError(
            "parallel.zero_stage: ZeRO-3 shards parameters, which pipeline stages (pp > 1) cannot use"
        )
    return schedule


def check_deepspeed_env(cfg: TrainConfig) -> None:
    """Refuse, before any worker starts, a DS_ACCELERATOR that the workers' device would refuse
    (`accelerator.use_accelerator_for`): ZeRO runs on DeepSpeed, whose accelerator must follow it.
    The workers of a local cluster inherit this process's environment, and so do those of a
    cluster this job was submitted to (the head's environment, which its driver runs in)."""
    if cfg.parallel.zero_stage == 0 or ACCELERATOR_ENV not in os.environ:
        return
    device = "cuda" if cfg.resources.gpus_per_worker > 0 else "cpu"
    try:
        use_accelerator_for(device, dict(os.environ))  # a copy: the driver's environment stays
    except AcceleratorError as err:
        raise ConfigError(str(err)) from None


def _backend(cfg: TrainConfig) -> str:
    if cfg.parallel.backend != "auto":
        return cfg.parallel.backend
    return "nccl" if cfg.resources.gpus_per_worker > 0 else "gloo"


def _storage(run_dir: str) -> tuple[str, object | None]:
    """Ray Train's storage under <run.dir>/ray: an absolute local path, or S3 (through pyarrow,
    honouring AWS_ENDPOINT_URL for S3-compatible stores)."""
    if run_dir.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        path = run_dir.rstrip("/") + "/ray"
        if endpoint:
            import pyarrow.fs

            return path[len("s3://") :], pyarrow.fs.S3FileSystem(endpoint_override=endpoint)
        return path, None
    return os.path.join(os.path.abspath(run_dir), "ray"), None


def launch_training(cfg: TrainConfig, raw_config: dict | None = None) -> dict:
    """Run a pipeline-parallel training job on Ray; return rank 0's summary dict."""
    from moeforge.platform.checkpoint.resume import check_resumable, resume_point
    from moeforge.platform.checkpoint.store import checkpoint_path, read_meta
    from moeforge.platform.launch.cluster_check import check_cluster_fits, worker_bundle
    from moeforge.platform.launch.cluster_wait import (
        is_start_timeout,
        note_wait,
        wait_error,
        workers_wait_at_most,
    )
    from moeforge.platform.launch.rank_placement import clear_placement

    validate_pipeline(cfg)
    resume_step = resume_point(cfg)  # run.dir and its checkpoints: refused now, not on a worker
    if resume_step is not None:
        check_resumable(cfg, read_meta(checkpoint_path(cfg.run.dir, resume_step)))
    # Start-up takes tens of seconds before step 1 (Ray, then every worker importing torch and
    # building its stages): each phase says when it begins.
    print("moeforge: connecting to Ray", flush=True)
    ray = connect_ray()
    check_cluster_fits(cfg.parallel, cfg.resources, ray.cluster_resources())
    check_deepspeed_env(cfg)  # the workers inherit this environment (a local cluster, or the head's)
    note_wait(cfg.parallel, cfg.resources, cfg.cluster)

    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    par = cfg.parallel
    dist_timeout_s = int(max(60.0, 2 * par.p2p_timeout_s))
    storage_path, filesystem = _storage(cfg.run.dir)
    trainer = TorchTrainer(
        train_loop_per_worker,
        # A restarted worker group resumes its own newest checkpoint: `resume_point` above refused a
        # fresh run into a run.dir holding checkpoints, so any it finds later were written by this run.
        train_loop_config={
            "cfg": cfg,
            "restarted_resumes": cfg.checkpoint.max_failures > 0,
            "dist_timeout_s": dist_timeout_s,  # of a process group the placement makes again
            "record_comm": os.environ.get(RECORD_ENV, ""),  # `comm_record.start_recording`: workers record too
            "dump_grads": os.environ.get(GRAD_DUMP_ENV, ""),  # `grad_dump.dump_pipeline_grads`: workers dump too
        },
        scaling_config=ScalingConfig(
            num_workers=par.world_size,
            use_gpu=cfg.resources.gpus_per_worker > 0,
            resources_per_worker=worker_bundle(cfg.resources),
            placement_strategy=cfg.cluster.placement_strategy,
        ),
        run_config=RunConfig(
            name=f"{cfg.run.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}",
            storage_path=storage_path,
            storage_filesystem=filesystem,
            # After a worker dies the group restarts (up to max_failures times) and resumes from the
            # newest COMPLETE checkpoint, found through moeforge's own manifests (any layout, S3 or
            # local, the same rule the reference loop follows), not through ray.train.Checkpoint:
            # reporting checkpoints to Ray would copy every shard into Ray's storage a second time.
            # controller_failure_limit=0: a worker group that cannot start within cluster.wait_s
            # (`workers_wait_at_most`) fails the run; Ray Train's default retries it for ever.
            failure_config=FailureConfig(
                max_failures=cfg.checkpoint.max_failures, controller_failure_limit=0
            ),
        ),
        torch_config=TorchConfig(backend=_backend(cfg), timeout_s=dist_timeout_s),
    )
    clear_placement(cfg.run.dir)  # this launch's workers write their own; an older one would mislead
    print(
        f"moeforge: starting {par.world_size} Ray Train workers ({par.schedule} pp={par.pp} dp={par.dp} "
        f"ep={par.ep}); each builds its stages before step 1",
        flush=True,
    )
    try:
        with workers_wait_at_most(cfg.cluster.wait_s), stop_file_on_signal(cfg.run.dir):
            trainer.fit()
    except TrainingFailedError as err:
        if is_start_timeout(err):
            raise wait_error(cfg.parallel, cfg.resources, cfg.cluster) from None
        message = describe_failure(err, _ranks_of_ray_ranks(cfg.run.dir))
        record_failure(cfg.run.dir, message)
        raise PipelineRunError(message) from None
    return read_summary(cfg.run.dir)  # rank 0 printed the run's closing line, as one process does


@contextlib.contextmanager
def stop_file_on_signal(run_dir: str):
    """While the block runs (the driver waiting on its workers): the first Ctrl-C or SIGTERM writes
    run.dir/STOP, which the workers act on at the next step boundary (every rank stops after the
    same step, with a checkpoint, as a one-process run does on SIGTERM); a second one aborts at once
    (KeyboardInterrupt: Ray Train ends the workers without a checkpoint). Main thread only; Python
    delivers signals nowhere else, and elsewhere this does nothing."""
    import signal

    from moeforge.platform.outputs.run_files import STOP
    from moeforge.platform.outputs.storage import open_storage
    from moeforge.platform.train.signals import on_stop_signals

    asked: list[str] = []

    def handler(signum, frame):
        if asked:  # the second time: stop waiting for the step to finish
            raise KeyboardInterrupt
        asked.append(signal.Signals(signum).name)
        open_storage(run_dir).write_text(STOP, f"{asked[0]} to the driver\n")
        print(
            f"moeforge-train: {asked[0]}: stopping after the step in progress, with a checkpoint "
            "(again to stop at once, without one)",
            file=sys.stderr,
            flush=True,
        )

    with on_stop_signals(handler):
        yield


def _ranks_of_ray_ranks(run_dir: str) -> dict[int, int]:
    """Ray Train rank -> moeforge world rank, from the run's placement.json (empty: the same)."""
    from moeforge.platform.launch.rank_placement import read_placement

    record = read_placement(run_dir)
    if not record:
        return {}
    return {int(row["ray_rank"]): int(row["rank"]) for row in record.get("ranks", [])}


def describe_failure(err: Exception, rank_of_ray_rank: dict[int, int] | None = None) -> str:
    """One message naming every failed rank, root causes first: a rank that raised on its own comes
    before ranks that only timed out or lost their connection waiting for it. Ray Train keys the
    failures by its own worker rank; `rank_of_ray_rank` (the realized placement) turns them into
    the pipeline's world ranks when the placement renumbered the workers."""
    failures = getattr(err, "worker_failures", None)
    if not failures:
        return f"pipeline run failed: {err}"
    if rank_of_ray_rank:
        failures = {rank_of_ray_rank.get(rank, rank): exc for rank, exc in failures.items()}
    consequential = ("PeerTimeout", "did not complete", "Connection reset", "Connection closed")

    def order(item):
        rank, exc = item
        return (any(word in f"{type(exc).__name__} {exc}" for word in consequential), rank)

    lines = [
        f"rank {rank}: {type(exc).__name__}: {_first_lines(exc)}"
        for rank, exc in sorted(failures.items(), key=order)
    ]
    return "pipeline run failed on " + "; ".join(lines)


def _first_lines(exc: Exception, limit: int = 600) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."


def record_failure(run_dir: str, message: str) -> None:
    """summary.json of a failed run: what rank 0 recorded (steps, losses, its own error), with the
    error replaced by the driver's `message`, which names every failed rank. Best effort: a failure
    to write it is printed, never raised over the run's own error."""
    from moeforge.platform.outputs.metrics import TrainSummary
    from moeforge.platform.outputs.run_files import SUMMARY
    from moeforge.platform.outputs.storage import open_storage

    try:
        storage = open_storage(run_dir)
        summary = json.loads(storage.read_text(SUMMARY)) if storage.exists(SUMMARY) else {}
        if summary.get("status") != "failed":  # none yet, or an earlier run's: start afresh
            summary = TrainSummary(
                steps=0, first_loss=None, final_loss=None, tokens_per_s=0.0, elapsed_s=0.0
            ).to_dict()
        summary.update(status="failed", error=message)
        storage.write_text(SUMMARY, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    except Exception as err:  # noqa: BLE001
        print(f"could not write {run_dir}/{SUMMARY} after the failure: {err}")


def read_summary(run_dir: str) -> dict:
    from moeforge.platform.outputs.storage import open_storage

    return json.loads(open_storage(run_dir).read_text("summary.json"))


# ---- inside each Ray Train worker -----------------------------------------------------------------
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
      `zero_allow_untested_optimizer` (its AdamW matches the one-process reference: tests/test_zero_partition.py).
    """
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
        category=FutureWarning,
        module=r"torch\.distributed\.c10d_logger",
    )
    # "DeepSpeed" is deepspeed.utils.logger's name; a filter set before deepspeed creates it stays.
    drop_log_message("DeepSpeed", "**** You are using ZeRO with an untested optimizer")


def _bind_worker_device(res, parallel_cfg):
    """This worker's training device, made DeepSpeed's too: Ray Train's GPU when the run asks for
    GPUs (`res.gpus_per_worker`), else the CPU. With ZeRO (DeepSpeed), DS_ACCELERATOR is set from
    it; call this before anything imports deepspeed. Returns the device."""
    import torch
    from moeforge.platform.launch.accelerator import bind_device, use_accelerator_for

    if res.gpus_per_worker > 0:
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
    from moeforge.platform.train.trainer import Terminated, Trainer

    _quiet_ray_train_report_log()
    _quiet_third_party_console()
    cfg = config["cfg"]
    ctx = ray.train.get_context()
    par = cfg.parallel
    # First: the placement's collectives run on the current CUDA device, and nothing may import
    # deepspeed before its accelerator is chosen.
    device = _bind_worker_device(cfg.resources, par)
    if config.get("record_comm"):  # before DeepSpeed's comm backend keeps references to torch's calls
        from moeforge.platform.engine.comm_record import start_recording

        start_recording(config["record_comm"])
    if config.get("dump_grads"):  # the driver's MOEFORGE_DUMP_GRADS (`grad_dump.GRAD_DUMP_ENV`)
        from moeforge.platform.outputs.grad_dump import GRAD_DUMP_ENV

        os.environ[GRAD_DUMP_ENV] = config["dump_grads"]
    topo = Topology.for_schedule(par.schedule, par.pp, par.dp, par.ep, cfg.model.num_nextn_predict_layers > 0)
    # This worker's world rank is the placement's, which is Ray Train's own unless the plan
    # renumbered the workers (then the default process group was made again with it).
    placement = place_workers(topo, ctx.get_world_rank(), float(config.get("dist_timeout_s", 1800)))
    rank, world_size = placement.rank_of_ray_rank[ctx.get_world_rank()], ctx.get_world_size()
    threads = max(1, int(cfg.resources.cpus_per_worker))
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))

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
    trainer = Trainer.pipeline_rank(cfg, rank, world_size, log=log, report_to=report, restarted=restarted, device=device)
    try:
        trainer.train()
    except Terminated:  # every rank stopped after the same step, checkpointed: the run ends cleanly,
        pass  # and the driver reads "interrupted" in summary.json
