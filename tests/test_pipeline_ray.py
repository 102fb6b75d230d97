"""moeforge-train's pipeline path end to end: Ray Train workers own the stages (launch_training).

Four TorchTrainer launches (each costs seconds of Ray Train start-up): DualPipe pp=2 x dp=2 x ep=2
(four workers; experts sharded over the two replicas of each stage, tokens dispatched by all-to-all)
with ZeRO-1 (dense shard groups of 4 ranks, expert shard groups of 2) and without ZeRO, and DualPipe
pp=4 (no ZeRO, no EP) against the single-process reference loop (losses, pre-clip gradient norms, parameters: pipeline_cases.assert_matches_reference), and a
rank that never sends (a rank raising mid-step is tests/test_train_job.py's, through the console
script). Config errors are refused before any launch."""

from __future__ import annotations

import json
import re

import pytest
from moeforge.model.config import ConfigError
from moeforge.platform.config import TrainConfig
from moeforge.platform.runtime.comm_record import RECORD_ENV
from moeforge.platform.runtime.launch import PipelineRunError, launch_training
from moeforge.platform.runtime.nccl_rules import load_records, summarize, violations
from pipeline_cases import (
    assert_matches_reference,
    assert_timeline_runs_schedule,
    dump_grads,
    pipeline_config,
    pipeline_record,
    reference_run,
)


@pytest.mark.parametrize(
    "schedule, pp, dp, ep, microbatches, zero_stage",
    [
        # DualPipe pairs x dp replicas x EP: ZeRO-1 over the 4 ranks holding the same dense
        # parameters, and over the 2 holding the same experts (DeepSpeed's MoE parameter groups)
        ("dualpipe", 2, 2, 2, 4, 1),
        ("dualpipe", 2, 2, 2, 4, 0),  # the same with the plain step: expert all-reduce over 2 ranks
        ("dualpipe", 4, 1, 1, 8, 0),  # each stage on two ranks, both model ends on rank 0; plain pair all-reduce
    ],
)
def test_ray_pipeline_matches_reference(
    ray_cluster, tmp_path, monkeypatch, schedule, pp, dp, ep, microbatches, zero_stage
):
    raw = pipeline_config(tmp_path / "run", schedule, pp, dp, microbatches, zero_stage=zero_stage, ep=ep)
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
    assert_matches_reference(record, reference_run(raw, tmp_path / "reference"), label=label)
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
        "mfu",
        "bubble_fraction",
        "exposed_comm_s",
        "max_expert_load",
        "mean_expert_load",
    ):
        assert key in step, key
    assert step["max_expert_load"] >= step["mean_expert_load"] > 0
    if ep > 1:  # the token routing of the step; Ray placed every worker on this one node
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


@pytest.mark.parametrize(
    "kind, message",
    [
        # a rank that raises: tests/test_train_job.py runs it through moeforge-train (exit status 1)
        ("hang", r"rank 0: PeerTimeout: .* from rank 1 did not complete within parallel.p2p_timeout_s=5s"),
    ],
)
def test_ray_pipeline_failure_names_the_rank(ray_cluster, tmp_path, kind, message):
    raw = pipeline_config(
        tmp_path / "run",
        "1f1b",
        2,
        1,
        2,
        zero_stage=0,
        p2p_timeout_s=5.0,
        fault_injection={"rank": 1, "step": 1, "kind": kind},
    )
    with pytest.raises(PipelineRunError, match=message):
        launch_training(TrainConfig.from_dict(raw), raw)
    # the driver records the failure, naming the rank(s), in summary.json
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["error"].startswith("pipeline run failed on ") and re.search(message, summary["error"])


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
