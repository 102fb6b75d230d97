"""The pipeline executor on plain gloo process groups (spawned processes, no Ray): per-step losses and
final parameters equal the single-process reference loop; a hung peer ends the run naming the rank.

The Ray Train path (launch_training) is covered by tests/test_pipeline_ray.py."""

from __future__ import annotations

import pytest
from moeforge.platform.runtime.local_spawn import spawn_gloo
from moeforge.platform.runtime.pipeline_run import load_pipeline_params, train_from_dict
from pipeline_cases import (
    assert_losses_match,
    max_relative_difference,
    pipeline_config,
    reference_run,
)

# Every case has M * dp = 4 micro-batches of 2 sequences: one reference run serves them all.
CASES = [
    ("zb1p", 2, 1, 4, 0),  # split B / W, plain optimizer step
    ("dualpipev", 2, 1, 4, 0),  # 4 stages on 2 ranks, the local turn of the V
    ("1f1b", 4, 1, 4, 2),  # 4 stages, tied embedding across ranks 0 and 3 (MTP), ZeRO-2 norm over pp
    ("1f1b", 2, 2, 2, 2),  # dp=2 with DeepSpeed ZeRO-2
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    raw = pipeline_config("unused", "single", 1, 1, 4, 0)
    return reference_run(raw, tmp_path_factory.mktemp("reference"))


@pytest.mark.parametrize("schedule, pp, dp, microbatches, zero", CASES)
def test_pipeline_matches_reference(tmp_path, reference, schedule, pp, dp, microbatches, zero):
    raw = pipeline_config(tmp_path / "run", schedule, pp, dp, microbatches, zero)
    results = spawn_gloo(train_from_dict, pp * dp, (raw, True))
    summary = results[0]
    ref_losses, ref_params = reference
    assert_losses_match(summary["losses"], ref_losses)
    worst, name = max_relative_difference(load_pipeline_params(raw["run"]["dir"]), ref_params)
    assert worst <= 1e-5, f"{name}: max relative difference {worst:.2e}"
    # the measured timeline was drawn and the pipeline metrics are there
    assert summary["timeline_png"].endswith("timeline.png")
    assert (tmp_path / "run" / "timeline.png").stat().st_size > 0
    assert 0.0 <= summary["bubble_fraction"] < 1.0
    assert summary["exposed_comm_s"] >= 0.0


def test_hung_peer_fails_with_rank_named(tmp_path):
    """Rank 1 stops mid-step 1 and never sends; rank 0's receive times out naming rank 1."""
    raw = pipeline_config(
        tmp_path / "run",
        "1f1b",
        2,
        1,
        2,
        0,
        p2p_timeout_s=3.0,
        fault_injection={"rank": 1, "step": 1, "kind": "hang"},
    )
    with pytest.raises(
        RuntimeError, match=r"rank 0 .*from rank 1 did not complete within parallel.p2p_timeout_s=3s"
    ):
        spawn_gloo(train_from_dict, 2, (raw, True), timeout_s=60)
