"""moeforge-train's pipeline path end to end: Ray Train workers own the stages (launch_training).

One TorchTrainer launch (each costs tens of seconds of Ray Train start-up here): DualPipe pp=2 x
dp=2 x ep=2 (four workers; experts sharded over the two replicas of each stage, tokens dispatched by
all-to-all) with ZeRO-1 (dense shard groups of 4 ranks, expert shard groups of 2; tracked with W&B
offline and evaluated), against the single-process reference loop
(pipeline_cases.assert_matches_reference), what the workers post held to NCCL's rules. The same
layout with the plain step runs on gloo processes in tests/test_ep_parity.py. Config
errors are refused before any launch. The same schedules on gloo processes, a peer that never
sends among them, are tests/test_pipeline_executor.py's; a rank raising through moeforge-train is
tests/test_train_job.py's; a worker killed and restarted by Ray Train, tests/test_recovery.py's."""

from __future__ import annotations

import glob
import json

import pytest
from moeforge.model.config import ConfigError
from moeforge.platform.config import TrainConfig
from moeforge.platform.engine.comm_record import RECORD_ENV
from moeforge.platform.engine.nccl_rules import load_records, summarize, violations
from moeforge.platform.launch.ray_train import launch_training
from pipeline_cases import (
    assert_matches_reference,
    assert_timeline_runs_schedule,
    dump_grads,
    pipeline_config,
    pipeline_record,
    reference_run,
)
from test_tracking import read_wandb_records


@pytest.mark.parametrize(
    "schedule, pp, dp, ep, microbatches, zero_stage",
    [
        # DualPipe pairs x dp replicas x EP: ZeRO-1 over the 4 ranks holding the same dense
        # parameters, and over the 2 holding the same experts (DeepSpeed's MoE parameter groups)
        ("dualpipe", 2, 2, 2, 4, 1),
    ],
)
def test_ray_pipeline_matches_reference(
    ray_cluster, tmp_path, monkeypatch, schedule, pp, dp, ep, microbatches, zero_stage
):
    raw = pipeline_config(tmp_path / "run", schedule, pp, dp, microbatches, zero_stage=zero_stage, ep=ep)
    # the run also tracks with W&B (offline) and evaluates
    raw["tracking"] = {"backend": "wandb", "mode": "offline", "log_timeline": True}
    raw["run"].update(eval_every=2, eval_batches=1)
    # Ray Train's workers record what they post (the placement's collectives and DeepSpeed's
    # included), held to NCCL's rules as the gloo cases of test_nccl_order.py are.
    monkeypatch.setenv(RECORD_ENV, str(tmp_path / "comm"))
    dump_grads(monkeypatch)  # the workers write their step-1 gradients for the comparison
    summary = launch_training(TrainConfig.from_dict(raw), raw)
    per_rank = load_records(str(tmp_path / "comm"))
    assert sorted(per_rank) == list(range(pp * dp)) and summarize(per_rank).p2p_ops > 0
    found = violations(per_rank)
    assert not found, "\n".join(found[:8])
    record = pipeline_record(tmp_path / "run")
    assert summary["losses"] == record.losses
    label = f"Ray {schedule} pp={pp} dp={dp} ep={ep} ZeRO-{zero_stage}"
    untracked = {**raw, "tracking": {"log_timeline": False}}
    assert_matches_reference(record, reference_run(untracked, tmp_path / "reference"), label=label)
    _assert_wandb_ran_on_rank_0(tmp_path / "run", steps=len(record.losses))
    # rank 0 recorded the run: per-step metrics with the pipeline fields, the measured timeline
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    step = json.loads(lines[-1])
    for key in (
        "loss",
        "mtp_loss",
        "aux_loss",
        "grad_norm",
        "lr",
        "tokens_per_s",
        "bubble_fraction",
        "exposed_comm_s",
        "max_expert_load",
        "mean_expert_load",
    ):
        assert key in step, key
    assert "mfu" not in step  # no parallel.peak_tflops_per_worker: no MFU, rather than 0
    assert step["max_expert_load"] >= step["mean_expert_load"] > 0
    # the token routing of the step; Ray placed every worker on this one node
    assert step["ep_nodes_per_token_max"] == 1
    assert 1 <= step["ep_ranks_per_token_mean"] <= step["ep_ranks_per_token_max"] <= 2
    assert (tmp_path / "run" / "timeline.png").stat().st_size > 0
    # the gathered timeline holds every world rank's compute actions, forwards and backwards
    trace = json.loads((tmp_path / "run" / "timeline.json").read_text())["traceEvents"]
    for kind in ("F", "SEND"):
        ranks = {e["tid"] for e in trace if e.get("ph") == "X" and e["cat"] == kind}
        assert ranks == set(range(pp * dp)), (kind, ranks)
    # ... each rank's the simulator's action list, with the recorded bubble and exposed communication
    assert_timeline_runs_schedule(tmp_path / "run", schedule, pp, dp, microbatches)
    assert summary["final_loss"] == summary["losses"][-1]


def _assert_wandb_ran_on_rank_0(run_dir, steps: int) -> None:
    """One offline W&B run, written by rank 0 only: every step's metrics with the pipeline's and
    the evaluation's, the timeline image, the summary."""
    (wandb_file,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = read_wandb_records(wandb_file)
    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    assert sorted({h.step.num for h in history}) == list(range(1, steps + 1))
    keys = {item.key or "/".join(item.nested_key) for h in history for item in h.item}
    expected = {"loss", "mtp_loss", "aux_loss", "grad_norm", "lr", "tokens_per_s", "eval_loss"}
    expected |= {"bubble_fraction", "exposed_comm_s", "max_expert_load", "mean_expert_load", "timeline/_type"}
    assert expected <= keys, expected - keys
    summary_keys = {i.key for r in records if r.WhichOneof("record_type") == "summary" for i in r.summary.update}
    assert {"final_loss", "tokens_per_s", "bubble_fraction", "eval_loss"} <= summary_keys, summary_keys
    assert glob.glob(str(run_dir / "wandb" / "offline-run-*" / "files" / "media" / "images" / "timeline*.png"))


@pytest.mark.parametrize(
    "parallel, field",
    [
        ({"schedule": "dualpipe", "pp": 2, "microbatches": 3}, "parallel.microbatches"),  # odd for DualPipe
        (
            {"schedule": "1f1b", "pp": 3, "microbatches": 2, "dp": 1},
            "layers_per_stage",
        ),  # 4 layers / 3 stages
        ({"schedule": "1f1b", "pp": 2, "microbatches": 2, "layers_per_stage": [1, 2]}, "sums to 3"),
        ({"schedule": "1f1b", "pp": 4, "microbatches": 2, "cpus_per_worker": 4}, "the cluster has 8"),
    ],
)
def test_bad_pipeline_config_refused_before_launch(ray_cluster, tmp_path, parallel, field):
    raw = pipeline_config(tmp_path / "run", "1f1b", 2, 1, 2, 0)
    raw["parallel"].update(parallel)
    raw["data"]["global_batch"] = 12 if parallel.get("pp") == 3 or parallel.get("microbatches") == 3 else 8
    with pytest.raises(ConfigError, match=field):
        launch_training(TrainConfig.from_dict(raw), raw)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
