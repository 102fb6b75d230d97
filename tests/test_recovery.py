"""A pipeline run recovers by itself from a worker killed with SIGKILL.

DualPipe pp=2 with ZeRO-1 through Ray Train (`launch_training`), checkpoints every 2 steps,
`checkpoint.max_failures=1`. The test-only fault hook SIGKILLs rank 1's process during step 3 (after
the step-2 checkpoint): no exception, no cleanup, as a lost node. Ray Train restarts the worker group,
which resumes from the step-2 checkpoint (weights, ZeRO partitions, router biases, RNG, data
position) and recomputes steps 3 and 4. The per-step losses and gradient norms must equal an
uninterrupted run's exactly, and metrics.jsonl must hold each step once.
"""

from __future__ import annotations

import json

from moeforge.platform.config import TrainConfig
from moeforge.platform.runtime.launch import launch_training
from moeforge.platform.runtime.local_spawn import spawn_gloo
from moeforge.platform.runtime.pipeline_run import train_from_dict
from pipeline_cases import pipeline_config

STEPS, EVERY = 4, 2


def _config(run_dir, **checkpoint) -> dict:
    raw = pipeline_config(run_dir, "dualpipe", 2, 1, 4, zero_stage=1, cpus_per_worker=1)
    raw["run"].update(steps=STEPS)
    raw["tracking"] = {"log_timeline": False}
    raw["checkpoint"] = {"every": EVERY, "keep": 2, "resume": False, **checkpoint}
    return raw


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_sigkilled_worker_restarts_and_repeats_the_uninterrupted_run(ray_cluster, tmp_path):
    straight_dir = tmp_path / "straight"
    straight = spawn_gloo(train_from_dict, 2, (_config(straight_dir), True))[0]

    killed_dir = tmp_path / "killed"
    raw = _config(killed_dir, max_failures=1)
    raw["parallel"]["fault_injection"] = {"rank": 1, "step": EVERY, "kind": "sigkill"}
    summary = launch_training(TrainConfig.from_dict(raw), raw)

    # the kill happened (the hook marks it before it kills), in step 3, after the step-2 checkpoint
    assert (killed_dir / f"fault_injection.rank1.step{EVERY}").exists()
    assert summary["status"] == "completed"
    assert summary["resumed_from_step"] == EVERY  # the restarted group resumed by itself
    assert summary["losses"] == straight["losses"], (summary["losses"], straight["losses"])
    records = _records(killed_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # recomputed, not duplicated
    assert [r["grad_norm"] for r in records] == [r["grad_norm"] for r in _records(straight_dir)]
