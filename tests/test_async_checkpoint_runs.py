"""checkpoint.async in the two training loops: the checkpoints written in the background are the
ones a synchronous run writes (a resume from them repeats the straight run bit for bit), the last one
is complete before the run ends, and the run reports each once it is complete. A background write
that the storage refuses does what checkpoint.async_failure says, in both loops: "continue" reports
each failure and trains on (and a loss spike then has no checkpoint to roll back to: reported,
trained through), "fail" ends the run at its next step.

The writer itself (snapshot at submit, one in flight, failure policies, S3) is tested in
tests/test_checkpoint_async.py; a pipeline run writing asynchronously to S3 and restarted after a
lost worker in tests/test_recovery.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from moeforge.platform.checkpoint.state import CheckpointError
from moeforge.platform.checkpoint.store import list_checkpoints, read_meta
from moeforge.platform.config import TrainConfig
from moeforge.platform.launch.local_spawn import spawn_gloo
from moeforge.platform.train.pipeline import run_pipeline_training, train_from_dict
from moeforge.platform.train.trainer import Trainer
from pipeline_cases import assert_losses_match, pipeline_config

STEPS, EVERY = 4, 2


def _raw(run_dir, schedule="dualpipe", pp=2, **checkpoint) -> dict:
    raw = pipeline_config(run_dir, schedule, pp, 1, 4, zero_stage=1 if pp > 1 else 0)
    raw["run"].update(steps=STEPS)
    raw["tracking"] = {"log_timeline": False}
    raw["checkpoint"] = {"every": EVERY, "keep": 3, "resume": True, "async": True, **checkpoint}
    if schedule == "single":
        raw["parallel"] = {"schedule": "single", "microbatches": 4}
    return raw


def _only_first_checkpoint(src, dst) -> None:
    shutil.copytree(src, dst)
    for step, path in list_checkpoints(str(dst)):
        if step > EVERY:
            shutil.rmtree(path)
    (dst / "summary.json").unlink()


def _grad_norms(run_dir) -> list[float]:
    return [json.loads(line)["grad_norm"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_reference_loop_async_checkpoints_resume_bitwise(tmp_path):
    lines: list[str] = []
    cfg = TrainConfig.from_dict(_raw(tmp_path / "straight", "single", 1))
    straight = Trainer.single(cfg, log=lines.append).train()
    assert [s for s, _ in list_checkpoints(str(tmp_path / "straight"))] == [2, 4]
    assert straight.checkpoint.endswith("step_00000004")  # complete before train() returned
    assert sum("checkpoint at step" in line for line in lines) == 2  # each reported once, when complete

    _only_first_checkpoint(tmp_path / "straight", tmp_path / "resumed")
    resumed = Trainer.single(
        TrainConfig.from_dict(_raw(tmp_path / "resumed", "single", 1)), log=lambda _l: None
    )
    assert resumed.step == EVERY
    assert resumed.train().losses == straight.losses
    # the same bytes a synchronous run writes: both runs' step-4 weights are identical
    sync = Trainer.single(TrainConfig.from_dict(_raw(tmp_path / "sync", "single", 1, **{"async": False})))
    sync.train()
    for name, value in sync.engine.model.state_dict().items():
        assert torch.equal(resumed.engine.model.state_dict()[name], value), name


def test_pipeline_async_checkpoints_commit_every_shard_and_resume_bitwise(tmp_path):
    straight = spawn_gloo(train_from_dict, 2, (_raw(tmp_path / "straight"), True))[0]
    found = list_checkpoints(str(tmp_path / "straight"))
    assert [s for s, _ in found] == [2, 4] and straight["checkpoint"].endswith("step_00000004")
    assert sorted(read_meta(found[-1][1]).shards) == ["rank0_0", "rank1_0"]

    _only_first_checkpoint(tmp_path / "straight", tmp_path / "resumed")
    resumed = spawn_gloo(train_from_dict, 2, (_raw(tmp_path / "resumed"), True))[0]
    assert resumed["resumed_from_step"] == EVERY
    assert resumed["losses"] == straight["losses"]
    assert _grad_norms(tmp_path / "resumed") == _grad_norms(tmp_path / "straight")


# --- background writes the storage refuses ------------------------------------------------------------------
REFUSED = "NotADirectoryError"
NO_ROLLBACK = "no checkpoint to roll back to: training on"


def _refusing_run_dir(run_dir):
    """A run.dir whose storage refuses every checkpoint write: a regular file where the checkpoints
    folder goes, so each write under it fails (NotADirectoryError). The run's other records go
    through; file permissions would not do, since the tests may run as root."""
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoints").write_text("not a folder\n")
    return run_dir


def _refused_raw(run_dir, policy: str, pipeline: bool = True, spike: bool = False) -> dict:
    """4 steps of DualPipe pp=2 (plain step) or its reference loop, checkpoint.async after every
    step under checkpoint.async_failure=`policy`; with `spike`, losses x10 on batch 2 (step 3) and
    run.spike_policy=rollback over a window of 2."""
    raw = pipeline_config(run_dir, "dualpipe", 2, 1, 4, zero_stage=0)
    raw["run"].update(steps=4)
    raw["tracking"] = {"log_timeline": False}
    raw["checkpoint"] = {"every": 1, "keep": 2, "resume": True, "async": True, "async_failure": policy}
    if spike:
        raw["run"].update(spike_policy="rollback", spike_window=2, spike_factor=3.0)
        raw["debug"] = {"fault_injection": {"kind": "loss_spike", "batch": 2}}
    if not pipeline:
        raw["parallel"] = {"schedule": "single", "microbatches": 4}
    return raw


def _train_logged(rank: int, world_size: int, raw: dict) -> tuple[dict | None, list[str]]:
    """One pipeline rank's run (spawn_gloo entry), with the lines it logged."""
    lines: list[str] = []
    summary = run_pipeline_training(TrainConfig.from_dict(raw), rank, world_size, log=lines.append)
    return summary, lines


def _reference_logged(raw: dict) -> tuple[Trainer, list[str]]:
    lines: list[str] = []
    trainer = Trainer.single(TrainConfig.from_dict(raw), log=lines.append)
    return trainer, lines


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_refused_writes_under_continue_train_on_and_a_spike_has_nothing_to_roll_back_to(tmp_path):
    """Both loops, checkpoint.async_failure=continue, every checkpoint write refused: each failure is
    reported once, in step order, and training goes on; the loss spike of step 3 finds no complete
    checkpoint, so it is reported and trained through (no rollback, its record kept). The pipeline's
    losses are the reference loop's."""
    pipe_dir = _refusing_run_dir(tmp_path / "pipeline")
    summary, pipe_lines = spawn_gloo(_train_logged, 2, (_refused_raw(pipe_dir, "continue", spike=True),))[0]
    ref_dir = _refusing_run_dir(tmp_path / "reference")
    trainer, ref_lines = _reference_logged(_refused_raw(ref_dir, "continue", pipeline=False, spike=True))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each pipeline worker runs: the same summation order
    try:
        reference = trainer.train()
    finally:
        torch.set_num_threads(threads)

    for lines, run_dir in ((pipe_lines, pipe_dir), (ref_lines, ref_dir)):
        failed = [line for line in lines if line.startswith("async checkpoint of step ")]
        assert [int(line.split()[4]) for line in failed] == [1, 2, 3, 4], failed
        assert all(REFUSED in line and "training continues" in line for line in failed), failed
        spikes = [line for line in lines if NO_ROLLBACK in line]
        assert len(spikes) == 1 and spikes[0].startswith("loss spike at step 3 ("), spikes
        records = _records(run_dir)
        assert [r["step"] for r in records] == [1, 2, 3, 4]
        assert records[2]["loss"] > 3 * max(records[0]["loss"], records[1]["loss"])  # the spike, kept
        assert list_checkpoints(str(run_dir)) == []
    assert summary["status"] == "completed" and summary["rollbacks"] == [] and summary["checkpoint"] is None
    assert reference.rollbacks == [] and trainer.engine.writer.failures == 4
    assert_losses_match(summary["losses"], reference.losses)


def test_reference_loop_refused_write_under_fail_ends_the_run_at_its_next_step(tmp_path):
    """checkpoint.async_failure=fail: the refused write of step 1 ends the run at step 2 at the
    latest with a CheckpointError naming step 1; summary.json records it. The state is consistent
    there (the failure comes between steps), so the run tries to keep its last completed step in a
    synchronous checkpoint, which the same storage refuses: reported, the original error stands."""
    run_dir = _refusing_run_dir(tmp_path / "run")
    trainer, lines = _reference_logged(_refused_raw(run_dir, "fail", pipeline=False))
    with pytest.raises(CheckpointError, match=rf"^async checkpoint of step 1 failed: {REFUSED}"):
        trainer.train()
    assert [r["step"] for r in _records(run_dir)] in ([1], [1, 2])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["error"].startswith(f"CheckpointError: async checkpoint of step 1 failed: {REFUSED}")
    kept = [line for line in lines if line.startswith("could not write a checkpoint after the failure: ")]
    assert len(kept) == 1 and "Not a directory" in kept[0], lines
    assert list_checkpoints(str(run_dir)) == []


def test_pipeline_refused_write_under_fail_ends_the_run_at_its_next_step(tmp_path):
    """checkpoint.async_failure=fail in a pipeline run: a rank's refused write of step 1 ends the
    run at step 2 at the latest (every rank writes, so whichever reports first names it), nothing is
    committed."""
    run_dir = _refusing_run_dir(tmp_path / "run")
    raw = _refused_raw(run_dir, "fail")
    raw["run"]["steps"] = 3
    with pytest.raises(RuntimeError, match=rf"CheckpointError: async checkpoint of step 1 failed: {REFUSED}"):
        spawn_gloo(train_from_dict, 2, (raw, True))
    assert [r["step"] for r in _records(run_dir)] in ([1], [1, 2])
    assert list_checkpoints(str(run_dir)) == []
