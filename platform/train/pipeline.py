"""A pipeline rank's whole run as one call, for spawned gloo processes, tests and benchmarks
(`run_pipeline_training`, `train_from_dict`); Ray Train workers call `Trainer.pipeline_rank`
themselves (`ray_train.train_loop_per_worker`).

A pipeline run's failure: rank 0 records what it has; the Ray driver
(`platform.launch.ray_train.describe_failure`) then names every failed rank in the summary. A failure
checkpoint is written only when every rank stopped at the same step (SIGTERM, agreed at the step
boundary); otherwise the newest periodic checkpoint stands, and within checkpoint.max_failures Ray Train
restarts the group, which resumes from it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from moeforge.platform.config.train import TrainConfig
from moeforge.platform.train.trainer import Trainer


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
    """The whole run on one rank (`Trainer.pipeline_rank(...).train()`), for callers that want the
    result: rank 0 returns summary.json's record, the other ranks None.

    `report` (Ray Train's, a barrier) is called on EVERY rank at the same steps (each log step and
    the last), with rank 0's metrics; other ranks pass an empty dict. Evaluation and checkpoints are
    collective too: every rank takes part at the same steps. `restarted_resumes`: this run may be a
    restarted worker group (checkpoint.max_failures), which resumes its own newest checkpoint."""
    trainer = Trainer.pipeline_rank(
        cfg, rank, world_size, log=log, report_to=report, restarted=restarted_resumes, source=source, device=device
    )
    trainer.train()
    return trainer.summary_record


def train_from_dict(rank: int, world_size: int, raw_config: dict, quiet: bool = False) -> dict | None:
    """`run_pipeline_training` from a plain config dict (picklable entry for spawned processes)."""
    cfg = TrainConfig.from_dict(raw_config)
    return run_pipeline_training(cfg, rank, world_size, log=(lambda _line: None) if quiet else print)
