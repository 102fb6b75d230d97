"""The whole pipeline run on one rank (what each Ray Train worker runs), around its steps.

Around the steps (`run_pipeline_training`, mirroring the reference loop's `train`):
    evaluate    every run.eval_every steps and at the end: a forward-only pass of run.eval_batches
                held-out batches along the stage route of micro-batch 0 (`Schedule.route`), one
                stage after the other with blocking send/recv: no schedule, no overlap, but the same
                stage code and weights as training, so it equals the reference's `evaluate`. Each dp
                replica evaluates its rows of every val batch; the mean over replicas is the mean
                over the whole batch (equal token counts).
    checkpoint  every checkpoint.every steps and at the end: every rank writes its shard (its stage
                modules with router biases, its optimizer state, its RNG), barrier, rank 0 commits
                with world {pp, dp} and samples_consumed (platform/checkpoint/store.py's contract).
    resume      checkpoint.resume: every rank loads its own shard of the newest complete checkpoint
                (rank 0 picks it, the others take its step).
    resume      (any layout wrote the checkpoint: platform/checkpoint/reshard.py)
    warm-up     before the first step every rank compiles and tunes its Triton kernels on the
                step's shapes, then a barrier (rank 0 logs how long the slowest rank took)
    failure     rank 0 records what it has (metrics, summary.json with status "failed" and its
                error); the driver (platform/launch/ray_train.py) then names every failed rank in the summary.
                No failure checkpoint: that would need every rank alive and at a common step.
                Within checkpoint.max_failures Ray Train restarts the group, which resumes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from moeforge.platform.config.cadence import Cadence
from moeforge.platform.config.train import TrainConfig
from moeforge.platform.engine.comm_record import record_comm_from_env
from moeforge.platform.engine.rank_engine import RankEngine
from moeforge.platform.optim.bad_steps import BadStepPolicy
from moeforge.platform.outputs.pipeline_report import PipelineReport
from moeforge.platform.outputs.storage import open_storage


def load_pipeline_params(run_dir: str) -> dict[str, torch.Tensor]:
    """Merge the per-stage safetensors files written by `save_params` into one full-model dict;
    expert slices (pp<r>.ep<e>.safetensors) are concatenated along the expert dimension in EP order."""
    from safetensors.torch import load

    storage = open_storage(run_dir)
    merged: dict[str, torch.Tensor] = {}
    slices: dict[str, dict[int, torch.Tensor]] = {}  # name -> EP rank -> slice
    for name in sorted(storage.list("params")):
        if not name.endswith(".safetensors"):
            continue
        rel = name if name.startswith("params/") else f"params/{name}"
        stem = rel.rsplit("/", 1)[-1].removesuffix(".safetensors")
        tensors = load(storage.read_bytes(rel))
        if ".ep" in stem:
            ep_rank = int(stem.rsplit(".ep", 1)[1])
            for key, value in tensors.items():  # a DualPipe pair writes the same slices twice
                slices.setdefault(key, {})[ep_rank] = value
        else:
            merged.update(tensors)
    for key, parts in slices.items():
        merged[key] = torch.cat([parts[e] for e in sorted(parts)])
    return merged


def run_pipeline_training(
    cfg: TrainConfig,
    rank: int,
    world_size: int,
    report: Callable[[dict], None] | None = None,
    log: Callable[[str], None] = print,
    source=None,
    device: torch.device | str = "cpu",
    restarted_resumes: bool = False,
) -> dict | None:
    """The whole run on one rank; rank 0 returns the summary (see platform/launch/worker.py).

    `report` (Ray Train's, a barrier) is called on EVERY rank at the same steps (each log step and
    the last), with rank 0's metrics; other ranks pass an empty dict. Evaluation and checkpoints are
    collective too: every rank takes part at the same steps. `restarted_resumes`: this run may be a
    restarted worker group (checkpoint.max_failures), which resumes its own newest checkpoint."""
    record_comm_from_env()
    runtime = RankEngine(cfg, rank, world_size, source=source, device=device, log=log)
    resumed = runtime.resume(restarted=restarted_resumes)
    warmed = runtime.warm_up_kernels()
    if warmed is not None:
        log(warmed)
    reporter = _rank0_report(cfg, runtime, log, resumed) if rank == 0 else None
    if reporter is not None and runtime.resharded:
        world = " ".join(f"{k}={v}" for k, v in sorted(runtime.resharded_from.items()))
        log(
            f"resharded: {resumed} was written by {world}; weights and optimizer restored by name, "
            "RNG streams start from run.seed"
        )
    cadence = Cadence.of(cfg)
    bad_steps = BadStepPolicy(cfg.run)  # every rank sees the same global loss: all decide alike
    try:
        while runtime.step < cfg.run.steps:
            for done, path in runtime.completed_checkpoints():  # checkpoint.async
                if reporter is not None:
                    reporter.checkpointed(done, path)
            step = runtime.step + 1
            metrics = runtime.train_step(gather_timeline=cfg.tracking.log_timeline and cadence.logs(step))
            evaluation = runtime.evaluate() if cadence.evaluates(step) else None
            record = reporter.record_step(metrics, evaluation) if reporter is not None else {}
            if report is not None and cadence.logs(step):
                report(record)
            bad_steps.after_step(step, metrics.base.loss, metrics.base.skipped)
            spike, median = bad_steps.is_spike(metrics.base.loss)
            if spike:
                rollback = bad_steps.roll_back(step, metrics.base.loss, median, runtime.roll_back, log)
                if rollback is not None:
                    if reporter is not None:
                        reporter.rewind(rollback)
                    continue
            if cadence.checkpoints(step):
                if reporter is not None:
                    reporter.flush()  # a resumed run finds every record its checkpoint covers
                path = runtime.save_checkpoint()
                if reporter is not None and runtime.writer is None:
                    reporter.checkpointed(step, path)
        for done, path in runtime.completed_checkpoints(wait=True):
            if reporter is not None:
                reporter.checkpointed(done, path)
        runtime.save_params(cfg.run.dir)
        dist.barrier()
    except BaseException as err:
        if reporter is not None:
            reporter.fail_pipeline(err)
        raise
    return reporter.finish_pipeline() if reporter is not None else None


def _rank0_report(cfg: TrainConfig, runtime: RankEngine, log, resumed: str | None) -> PipelineReport:
    peak = cfg.parallel.peak_tflops_per_worker * 1e12 * runtime.topo.world_size
    return PipelineReport(
        cfg,
        rank_params=sum(p.numel() for p in runtime.module.parameters()),
        log=log,
        start_step=runtime.step,
        resumed_from=resumed,
        flops_per_token=runtime.flops_per_token,
        peak_flops=peak or None,
    )


def train_from_dict(rank: int, world_size: int, raw_config: dict, quiet: bool = False) -> dict | None:
    """`run_pipeline_training` from a plain config dict (picklable entry for spawned processes)."""
    cfg = TrainConfig.from_dict(raw_config)
    return run_pipeline_training(cfg, rank, world_size, log=(lambda _line: None) if quiet else print)
