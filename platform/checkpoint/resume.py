"""Which checkpoint a run resumes from, whether it fits, and restoring it: one rule for every loop.

The single-process reference loop and the pipeline runtime (in its driver, before any worker
starts, and on each rank) ask the same questions, so a run.dir is judged the same way whatever
runs it. A checkpoint restores into any layout (`platform.checkpoint.reshard.CheckpointReader`): the model and
optimizer by name; the RNG states only into the layout that wrote them (they are per rank).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from moeforge.platform.checkpoint.reshard import CheckpointReader
from moeforge.platform.checkpoint.state import CheckpointError
from moeforge.platform.checkpoint.store import CheckpointMeta, list_checkpoints, shard_name
from moeforge.platform.config.builder import ConfigError
from moeforge.platform.config.train import TrainConfig
from moeforge.platform.outputs.storage import Storage, open_storage, redact


def resume_point(cfg: TrainConfig, storage: Storage | None = None, *, restarted: bool = False) -> int | None:
    """The step of the newest complete checkpoint a run resumes from, None for a fresh start.

    A fresh run that would checkpoint into a run.dir holding checkpoints is refused: its saves would
    collide with them and pruning would mix the two runs. `restarted`: this is a restart of a run
    after a lost worker (checkpoint.max_failures), whose driver checked run.dir at the start, so any
    checkpoint there is this run's own and it resumes from it whatever checkpoint.resume says."""
    ck = cfg.checkpoint
    if ck.resume or restarted:
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


def data_skip(meta: CheckpointMeta) -> int:
    """Global batches the run skipped before this checkpoint (loss-spike rollbacks): step s trains on
    batch s + data_skip."""
    return int(meta.extra.get("data_skip", 0))


def check_resumable(cfg: TrainConfig, meta: CheckpointMeta) -> None:
    """A checkpoint fits this run: its samples_consumed is its data position at this global batch.
    Any parallel layout fits (resharding). Raises CheckpointError."""
    expected = (meta.step + data_skip(meta)) * cfg.data.global_batch
    if meta.samples_consumed != expected:
        raise CheckpointError(
            f"{meta.path}: {meta.samples_consumed} samples consumed at step {meta.step}, but "
            f"data.global_batch={cfg.data.global_batch} puts step {meta.step} at sample {expected}; "
            "resume with the global batch the checkpoint was trained with"
        )


def layout_of(cfg: TrainConfig) -> dict[str, Any]:
    """What makes a rank's local state (its RNG streams) meaningful to the same rank only."""
    par = cfg.parallel
    return {"pp": par.pp, "dp": par.dp, "ep": par.ep, "schedule": par.schedule}


def same_layout(cfg: TrainConfig, meta: CheckpointMeta) -> bool:
    written = {"ep": 1, **meta.world, "schedule": meta.extra.get("schedule", "single")}
    return {k: written.get(k) for k in layout_of(cfg)} == layout_of(cfg)


def checkpoint_commit(
    cfg: TrainConfig, step: int, data_skip: int, world: Mapping[str, int], schedule: str
) -> dict[str, Any]:
    """commit_checkpoint's keyword arguments for the checkpoint after `step` steps, the same for
    both loops: `world` and `schedule` name the layout that writes it ({"pp": 1, "dp": 1} and
    "single" for the one-process loop; the pipeline's also records its ZeRO stage); `data_skip` is
    the batches rollbacks skipped, so samples_consumed is the data position a resume continues
    from."""
    extra: dict[str, Any] = {"schedule": schedule, "model": cfg.model.to_dict(), "data_skip": data_skip}
    extra["config"] = redact(dataclasses.asdict(cfg))  # what a resume names when its config differs
    if schedule != "single":
        extra["zero_stage"] = cfg.parallel.zero_stage
    return {
        "world": dict(world),
        "samples_consumed": (step + data_skip) * cfg.data.global_batch,
        "lr_step": step,
        "config": dataclasses.asdict(cfg),
        "extra": extra,
        "keep": cfg.checkpoint.keep,
    }


def restore_checkpoint(
    cfg: TrainConfig,
    path: str,
    state: Mapping[str, Any],
    *,
    shard: tuple[int, int] = (0, 0),
    storage: Storage | None = None,
) -> tuple[CheckpointMeta, bool]:
    """Restore `state` ({"model": ModelState, "optimizer": OptimizerState | ZeroOptimizerState,
    "rng": RNGState}) from the complete checkpoint at `path`, written by any layout; return its
    meta and whether the layout was the same (only then are this rank's RNG states restored)."""
    with CheckpointReader(path, storage) as reader:
        meta = reader.meta
        check_resumable(cfg, meta)
        state["model"].load_from(reader)  # first: ZeRO rebuilds its fp32 master from the weights
        state["optimizer"].load_from(reader)
        same = same_layout(cfg, meta)
        if same and "rng" in state:
            state["rng"].load_state_dict(reader.read_local(shard_name(shard), "rng"))
    return meta, same


def finished_run_note(cfg: TrainConfig, storage: Storage | None = None) -> str | None:
    """What to say instead of training when run.dir already holds a completed run of at least
    run.steps steps (its record is never rewritten), or None to go on. A completed run asked for
    more steps goes on only when it can continue from its own checkpoint; otherwise the new run
    would start over and overwrite the record, and ConfigError says so."""
    storage = storage if storage is not None else open_storage(cfg.run.dir)
    if not storage.exists("summary.json"):
        return None
    try:
        done = json.loads(storage.read_text("summary.json"))
    except ValueError:
        return None  # a damaged record: the run's own checks decide
    if done.get("status") != "completed":
        return None
    steps = int(done.get("steps", 0))
    found = list_checkpoints(cfg.run.dir, storage) if cfg.checkpoint.resume else []
    continues = bool(found) and found[-1][0] == steps
    where = f"run.dir {cfg.run.dir} already holds a completed run of {steps} steps"
    if steps >= cfg.run.steps:
        how = (
            f"raise run.steps above {steps} to continue it from its checkpoint"
            if continues
            else "it has no checkpoint of its last step to continue from"
        )
        return f"{where}; nothing to do ({how}, or choose another run.dir)"
    if not continues:
        raise ConfigError(
            f"run.dir: {where} and no checkpoint of step {steps} to continue from; a new run there would "
            "overwrite its record: choose another run.dir"
        )
    return None


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_changes(saved: Mapping[str, Any], cfg: TrainConfig) -> list[str]:
    """`key old -> new` for every config key whose value differs from the config that wrote the
    checkpoint (`saved`, as its meta records it), secrets redacted on both sides."""
    current = json.loads(json.dumps(redact(dataclasses.asdict(cfg)), default=str))  # as meta.json holds it
    old, new = _flatten(saved), _flatten(current)
    return [
        f"{key} {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


def lr_horizon_note(saved: Mapping[str, Any], cfg: TrainConfig, step: int) -> str | None:
    """When run.steps changed since the checkpoint was written: the LR schedule follows the new
    run.steps, and this says so with the next step's LR under both horizons."""
    from moeforge.platform.optim.lr_schedule import lr_at

    old_steps = (saved.get("run") or {}).get("steps")
    if old_steps is None or old_steps == cfg.run.steps:
        return None
    new_lr, old_lr = lr_at(step, cfg.optim, cfg.run.steps), lr_at(step, cfg.optim, int(old_steps))
    return (
        f"note: the LR schedule follows run.steps={cfg.run.steps} (the checkpoint's run had "
        f"{old_steps}): step {step + 1}'s LR is {new_lr:.3g}, {old_lr:.3g} under the old horizon"
    )
