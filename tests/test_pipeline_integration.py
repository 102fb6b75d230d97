"""A pipeline run has what the reference loop has: evaluation, checkpoints and resume, tracking, a
recorded failure.

In-process gloo runs (spawn_gloo, no Ray) check the numbers: the pipeline's eval loss equals the
reference loop's at the same steps, and a run resumed from its step-2 checkpoint (weights, DeepSpeed
ZeRO optimizer partition, RNG) reproduces the straight run's step-3/4 losses exactly. Through Ray
Train: W&B on rank 0 and evaluation are in the multi-node run of tests/test_placement.py, a resume
after a lost worker in tests/test_recovery.py.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from moeforge.platform.checkpoint.store import list_checkpoints, read_meta
from moeforge.platform.launch.local_spawn import spawn_gloo
from moeforge.platform.train.pipeline import train_from_dict
from pipeline_cases import (
    assert_matches_reference,
    dump_grads,
    pipeline_config,
    pipeline_record,
    reference_run,
)

STEPS, EVERY = 4, 2


def _config(run_dir, **run) -> dict:
    """DualPipe pp=2 with ZeRO-1: the two ranks of the pair form DeepSpeed's shard group, so each
    checkpoint shard holds a real ZeRO partition. Eval and checkpoints every 2 of 4 steps."""
    raw = pipeline_config(run_dir, "dualpipe", 2, 1, 4, zero_stage=1)
    raw["run"].update(steps=STEPS, eval_every=EVERY, eval_batches=1, **run)
    raw["checkpoint"] = {"every": EVERY, "keep": 2, "resume": True}
    return raw


def _metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _keep_only_first_checkpoint(src, dst) -> None:
    """run.dir as it was right after the step-2 checkpoint: later checkpoints and records removed
    (the resumed run itself drops metrics lines past its checkpoint)."""
    shutil.copytree(src, dst)
    for step, path in list_checkpoints(str(dst)):
        if step > EVERY:
            shutil.rmtree(path)
    os.remove(os.path.join(dst, "summary.json"))


def _assert_resumed_run_repeats(straight: dict, resumed: dict, straight_dir, resumed_dir) -> None:
    assert resumed["resumed_from_step"] == EVERY
    assert resumed["steps"] == STEPS
    # Optimizer moments, weights, router biases and RNG all restored: bit-identical losses.
    assert resumed["losses"] == straight["losses"], (resumed["losses"], straight["losses"])
    records = _metrics(resumed_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    # ... and bit-identical gradients: the same pre-clip norms as the straight run's, every step
    assert [r["grad_norm"] for r in records] == [r["grad_norm"] for r in _metrics(straight_dir)]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted 4-step run the others are held to (its summary and run.dir, with its
    step-1 gradients)."""
    straight_dir = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as patch:
        dump_grads(patch)
        summary = spawn_gloo(train_from_dict, 2, (_config(straight_dir), True))[0]
    return summary, straight_dir


def test_eval_checkpoint_resume_on_gloo(tmp_path, monkeypatch, straight_run):
    dump_grads(monkeypatch)
    straight, straight_dir = straight_run
    raw = _config(straight_dir)

    # losses, grad norms and parameters (4 steps, through two checkpoints) equal the reference loop's;
    # evaluation: every 2 steps, equal to the reference loop's eval loss at the same steps
    ref_raw = copy.deepcopy(raw)
    ref_raw["checkpoint"] = {"every": 0}
    reference = reference_run(ref_raw, tmp_path / "reference")
    assert_matches_reference(pipeline_record(straight_dir), reference, label="dualpipe pp=2 ZeRO-1, 4 steps")
    ref_eval = {r["step"]: r["eval_loss"] for r in _metrics(tmp_path / "reference") if "eval_loss" in r}
    pipe_eval = {r["step"]: r["eval_loss"] for r in _metrics(straight_dir) if "eval_loss" in r}
    assert sorted(pipe_eval) == sorted(ref_eval) == [2, 4]
    for step, ref in ref_eval.items():
        assert abs(pipe_eval[step] - ref) <= 1e-5 * abs(ref), (step, pipe_eval[step], ref)
    assert straight["eval_loss"] == pipe_eval[4]

    # checkpoints: one shard per rank with model, ZeRO optimizer partition and RNG; committed by rank 0
    found = list_checkpoints(str(straight_dir))
    assert [s for s, _ in found] == [2, 4]
    meta = read_meta(found[0][1])
    assert (
        meta.world == {"pp": 2, "dp": 1, "ep": 1} and meta.samples_consumed == 2 * raw["data"]["global_batch"]
    )
    assert sorted(meta.shards) == ["rank0_0", "rank1_0"]
    for shard in meta.shards.values():
        assert shard["parts"] == ["model", "optimizer", "rng"]
        # ZeRO-1 over the DualPipe pair: each rank holds part of every parameter group's flat
        # buffer, saved as pieces of per-parameter moments at their place in the whole model
        keys = shard["tensors"]
        moments = {k: v for k, v in keys.items() if k.startswith("optimizer/") and k.endswith("/exp_avg_sq")}
        assert moments, sorted(keys)[:5]
        for key, info in moments.items():
            assert info["offset"] + math.prod(info["shape"]) <= math.prod(info["global_shape"]), key
    # ... which together cover every element of every moment exactly (the two partitions tile it)
    covered: dict[str, set] = {}
    for shard in meta.shards.values():
        for key, info in shard["tensors"].items():
            if key.endswith("/exp_avg"):
                run = set(range(info["offset"], info["offset"] + math.prod(info["shape"])))
                assert not covered.setdefault(key, set()) & run, f"{key}: two ranks hold the same elements"
                covered[key] |= run
    for key, elements in covered.items():
        total = math.prod(
            next(s["tensors"][key]["global_shape"] for s in meta.shards.values() if key in s["tensors"])
        )
        assert elements == set(range(total)), key
    assert straight["checkpoint"].endswith("step_00000004")

    # resume from step 2 in a copy of the run.dir: steps 3 and 4 repeat the straight run's exactly
    resumed_dir = tmp_path / "resumed"
    _keep_only_first_checkpoint(straight_dir, resumed_dir)
    resumed = spawn_gloo(train_from_dict, 2, (_config(resumed_dir), True))[0]
    _assert_resumed_run_repeats(straight, resumed, straight_dir, resumed_dir)
    assert resumed["eval_loss"] == straight["eval_loss"]


def test_sigterm_on_one_rank_stops_every_rank_after_the_step_and_resumes_exactly(tmp_path, straight_run):
    """SIGTERM lands on rank 1 in the middle of step 3: every rank finishes step 3, stops, and the
    ranks write a checkpoint of step 3 together (not a multiple of checkpoint.every=2). The run
    resumed from it repeats the uninterrupted run's losses exactly."""
    straight, _ = straight_run
    stopped_dir = tmp_path / "stopped"
    raw = _config(stopped_dir)
    raw["debug"] = {"fault_injection": {"rank": 1, "step": 2, "kind": "sigterm"}}
    with pytest.raises(RuntimeError, match="Terminated"):
        spawn_gloo(train_from_dict, 2, (raw, True), timeout_s=60)
    summary = json.loads((stopped_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["error"].startswith("Terminated")
    assert summary["steps"] == 3 and summary["losses"] == straight["losses"][:3]
    assert [s for s, _ in list_checkpoints(str(stopped_dir))] == [2, 3]
    assert sorted(read_meta(list_checkpoints(str(stopped_dir))[-1][1]).shards) == ["rank0_0", "rank1_0"]

    resumed = spawn_gloo(train_from_dict, 2, (_config(stopped_dir), True))[0]
    assert resumed["resumed_from_step"] == 3 and resumed["status"] == "completed"
    assert resumed["losses"] == straight["losses"]
    assert [r["step"] for r in _metrics(stopped_dir)] == list(range(1, STEPS + 1))


def test_failed_run_records_rank0_error(tmp_path):
    """Rank 0 raises in its second step: summary.json says failed, with the error and the step done."""
    raw = pipeline_config(
        tmp_path / "run",
        "1f1b",
        2,
        1,
        2,
        0,
        p2p_timeout_s=5.0,
        debug={"fault_injection": {"rank": 0, "step": 1, "kind": "raise"}},
    )
    with pytest.raises(RuntimeError, match="InjectedFault"):  # rank 1 waits on rank 0: nothing to finish
        spawn_gloo(train_from_dict, 2, (raw, True), timeout_s=60, failure_grace_s=1.0)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["error"].startswith("InjectedFault: rank 0 (pp 0, dp 0): injected fault at step 1")
    assert summary["steps"] == 1 and len(summary["losses"]) == 1
    assert len(_metrics(tmp_path / "run")) == 1


def test_damaged_checkpoint_is_one_line_exit_2(tmp_path):
    """moeforge-train refuses to resume a corrupt checkpoint before any worker starts."""
    raw = pipeline_config(tmp_path / "run", "dualpipe", 2, 1, 4, 0)
    folder = tmp_path / "run" / "checkpoints" / "step_00000002"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text("{}\n")
    (folder / "COMPLETE").write_text('{"meta_sha256": "0"}\n')
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "moeforge-train"),
        "experiment=tiny_cpu_dualpipe",
        f"run.dir={raw['run']['dir']}",
        "checkpoint.every=2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moeforge-train: checkpoint error: "), proc.stderr[-2000:]
    assert "meta.json" in lines[0] and "corrupt" in lines[0]
