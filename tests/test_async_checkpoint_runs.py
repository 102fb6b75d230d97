"""checkpoint.async in the two training loops: the checkpoints written in the background are the
ones a synchronous run writes (a resume from them repeats the straight run bit for bit), the last one
is complete before the run ends, and the run reports each once it is complete.

The writer itself (snapshot at submit, one in flight, failure policies, S3) is tested in
tests/test_checkpoint_async.py.
"""

from __future__ import annotations

import json
import shutil

import torch
from moeforge.platform.checkpoint.store import list_checkpoints, read_meta
from moeforge.platform.config import TrainConfig
from moeforge.platform.reference.loop import ReferenceTrainer
from moeforge.platform.runtime.local_spawn import spawn_gloo
from moeforge.platform.runtime.pipeline_run import train_from_dict
from pipeline_cases import pipeline_config

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
    straight = ReferenceTrainer(cfg, log=lines.append).train()
    assert [s for s, _ in list_checkpoints(str(tmp_path / "straight"))] == [2, 4]
    assert straight.checkpoint.endswith("step_00000004")  # complete before train() returned
    assert sum("checkpoint at step" in line for line in lines) == 2  # each reported once, when complete

    _only_first_checkpoint(tmp_path / "straight", tmp_path / "resumed")
    resumed = ReferenceTrainer(
        TrainConfig.from_dict(_raw(tmp_path / "resumed", "single", 1)), log=lambda _l: None
    )
    assert resumed.step == EVERY
    assert resumed.train().losses == straight.losses
    # the same bytes a synchronous run writes: both runs' step-4 weights are identical
    sync = ReferenceTrainer(TrainConfig.from_dict(_raw(tmp_path / "sync", "single", 1, **{"async": False})))
    sync.train()
    for name, value in sync.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


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
