"""Which checkpoint a run resumes from, and whether it fits: one rule for every training loop.

The single-process reference loop and the pipeline runtime (in its driver, before any worker
starts, and on each rank) ask the same two questions, so a run.dir is judged the same way whatever
runs it.
"""

from __future__ import annotations

from moeforge.model.config import ConfigError
from moeforge.platform.checkpoint.state import CheckpointError
from moeforge.platform.checkpoint.store import CheckpointMeta, list_checkpoints
from moeforge.platform.config.train import TrainConfig
from moeforge.platform.outputs.storage import Storage


def resume_point(cfg: TrainConfig, storage: Storage | None = None) -> int | None:
    """The step of the newest complete checkpoint a run resumes from, None for a fresh start.

    A fresh run that would checkpoint into a run.dir holding checkpoints is refused: its saves would
    collide with them and pruning would mix the two runs."""
    ck = cfg.checkpoint
    if ck.resume:
        found = list_checkpoints(cfg.run.dir, storage)
        return found[-1][0] if found else None
    if ck.every:
        found = list_checkpoints(cfg.run.dir, storage)
        if found:
            raise ConfigError(
                f"checkpoint.resume: false, but run.dir {cfg.run.dir} holds checkpoints (newest: step "
                f"{found[-1][0]}); resume them (checkpoint.resume=true) or use another run.dir"
            )
    return None


def check_resumable(cfg: TrainConfig, meta: CheckpointMeta) -> None:
    """A checkpoint fits this run: same (pp, dp, ep) layout (one shard per rank, no resharding) and
    its samples_consumed is its step's position at this global batch. Raises CheckpointError."""
    world = {"pp": cfg.parallel.pp, "dp": cfg.parallel.dp, "ep": cfg.parallel.ep}
    written = {"ep": 1, **meta.world}  # checkpoints from before expert parallelism: ep = 1
    if {k: written.get(k) for k in world} != world:
        raise CheckpointError(
            f"{meta.path}: written by world {meta.world}, this run is {world} (resharding is not supported)"
        )
    expected = meta.step * cfg.data.global_batch
    if meta.samples_consumed != expected:
        raise CheckpointError(
            f"{meta.path}: {meta.samples_consumed} samples consumed at step {meta.step}, but "
            f"data.global_batch={cfg.data.global_batch} puts step {meta.step} at sample {expected}; "
            "resume with the global batch the checkpoint was trained with"
        )
