"""A pipeline run on S3 recovers by itself from a worker killed with SIGKILL.

DualPipe pp=2 with ZeRO-1 through Ray Train (`launch_training`), run.dir on S3 (moto's server),
asynchronous checkpoints after every step, `checkpoint.max_failures=1`. The test-only fault hook
SIGKILLs rank 1's process during step 4: no exception, no cleanup, as a lost node. Ray Train
restarts the worker group, which resumes from the newest complete checkpoint on S3 (weights, ZeRO
partitions, router biases, RNG, data position) and recomputes the steps after it. The per-step
losses and gradient norms must equal an uninterrupted run's exactly, and metrics.jsonl on S3 must
hold each step once.

Which checkpoint the restart finds: step 2's is complete when rank 1 dies (every rank's submit of
step 3 waited for its step-2 write, rank 0's for the commit, before the barrier that opens step 4);
step 3's may or may not have been committed in the background by then. Either is correct.

The driver runs as a Ray task whose runtime_env carries the S3 endpoint and throwaway credentials:
the session's cluster was started before they existed, and Ray Train's controller and workers
inherit the environment of the task that launches them (as a job's `--runtime-env-json` would give
them on a real cluster).
"""

from __future__ import annotations

import json
import os
import uuid

import boto3
from moeforge.platform.checkpoint.store import list_checkpoints
from moeforge.platform.config import TrainConfig
from moeforge.platform.launch.local_spawn import spawn_gloo
from moeforge.platform.launch.ray_train import launch_training
from moeforge.platform.train.pipeline import train_from_dict
from pipeline_cases import pipeline_config

STEPS = 4
KILLED_AT = 3  # steps done when rank 1 dies: it is killed in step 4
S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def _config(run_dir, **checkpoint) -> dict:
    raw = pipeline_config(run_dir, "dualpipe", 2, 1, 4, zero_stage=1, resources={"cpus_per_worker": 1})
    raw["run"].update(steps=STEPS)
    raw["tracking"] = {"log_timeline": False}
    raw["checkpoint"] = {"every": 2, "keep": 2, "resume": False, **checkpoint}
    return raw


def test_sigkilled_worker_on_s3_restarts_and_repeats_the_uninterrupted_run(
    ray_cluster, s3_server, tmp_path, monkeypatch
):
    straight_dir = tmp_path / "straight"
    straight = spawn_gloo(train_from_dict, 2, (_config(straight_dir), True))[0]

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    bucket = f"recovery-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    run_dir = f"s3://{bucket}/killed"
    raw = _config(run_dir, every=1, max_failures=1, **{"async": True})
    raw["debug"] = {"fault_injection": {"rank": 1, "step": KILLED_AT, "kind": "sigkill"}}

    def launch(raw: dict) -> dict:  # a local function: Ray ships it by value, not by module name
        return launch_training(TrainConfig.from_dict(raw), raw)

    env = {"env_vars": {name: os.environ[name] for name in S3_ENV}}
    summary = ray_cluster.get(ray_cluster.remote(num_cpus=0, runtime_env=env)(launch).remote(raw))

    def read(key: str) -> str:
        return s3.get_object(Bucket=bucket, Key=f"killed/{key}")["Body"].read().decode()

    # the kill happened (the hook marks it on S3 before it kills), in step 4
    assert read(f"fault_injection.rank1.step{KILLED_AT}") == "fired\n"
    assert summary["status"] == "completed"
    assert summary["resumed_from_step"] in (2, 3)  # the restarted group resumed from S3 by itself
    assert summary["losses"] == straight["losses"], (summary["losses"], straight["losses"])
    records = [json.loads(line) for line in read("metrics.jsonl").splitlines() if line.strip()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # recomputed, not duplicated
    straight_records = (straight_dir / "metrics.jsonl").read_text().splitlines()
    assert [r["grad_norm"] for r in records] == [json.loads(line)["grad_norm"] for line in straight_records]
    assert [step for step, _ in list_checkpoints(run_dir)] == [STEPS - 1, STEPS]  # keep=2, all committed
    assert json.loads(read("summary.json"))["status"] == "completed"
