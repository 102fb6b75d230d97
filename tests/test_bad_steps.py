"""Bad steps (platform/optim/bad_steps.py): a non-finite step skips its update, a loss spike rolls
the run back to its checkpoint and past the offending data, in the reference loop and in a pipeline
run alike.

Faults come from the test-only hook `debug.fault_injection {"kind": "nan_grad" | "loss_spike",
"batch": i}`, keyed by the data index: a rollback that really skips the batch never meets it again,
and one that did not would spike again until run.max_rollbacks ended the run.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from moeforge.platform.checkpoint.store import list_checkpoints, read_meta
from moeforge.platform.config import TrainConfig
from moeforge.platform.launch.local_spawn import spawn_gloo
from moeforge.platform.optim.bad_steps import BadStepError
from moeforge.platform.train.pipeline import train_from_dict
from moeforge.platform.train.trainer import Trainer
from pipeline_cases import assert_losses_match, final_params, pipeline_config, reference_run


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _raw(run_dir, steps: int, fault: dict, **run) -> dict:
    raw = pipeline_config(run_dir, "dualpipe", 2, 1, 4, zero_stage=0)
    raw["run"].update(steps=steps, **run)
    raw["debug"] = {"fault_injection": fault}
    raw["tracking"] = {"log_timeline": False}
    raw["checkpoint"] = {"every": 2, "keep": 5, "resume": True}
    return raw


def _reference(raw: dict, run_dir) -> Trainer:
    ref = copy.deepcopy(raw)
    ref["parallel"] = {
        "schedule": "single",
        "microbatches": 4,
    }
    ref["run"]["dir"] = str(run_dir)
    trainer = Trainer.single(TrainConfig.from_dict(ref), log=lambda _line: None)
    return trainer


def _train_one_thread(trainer: Trainer):
    """train() with one intra-op thread, as each pipeline worker runs (pipeline_cases.reference_run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return trainer.train()
    finally:
        torch.set_num_threads(threads)


def test_a_nan_gradient_skips_that_update_only(tmp_path):
    """Reference loop: batch 2's gradient is NaN, so step 3 changes no weight, moment or router
    bias; the run trains on and completes."""
    trainer = _reference(_raw(tmp_path / "unused", 5, {"kind": "nan_grad", "batch": 2}), tmp_path / "ref")
    for _ in range(2):
        assert not trainer.engine.train_step().skipped
    before = trainer.engine.state_dict()
    metrics = trainer.engine.train_step()
    assert metrics.skipped and math.isnan(metrics.grad_norm) and trainer.step == 3
    after = trainer.engine.state_dict()
    for part in ("model", "optimizer"):
        for key, value in before[part].items():
            assert torch.equal(after[part][key], value), f"{part}/{key} moved in a skipped step"
    summary = trainer.train()
    assert summary.steps == 5 and summary.skipped_steps == 0  # step 3 was recorded outside train()
    assert all(not r["skipped"] and math.isfinite(r["grad_norm"]) for r in _records(tmp_path / "ref"))


def test_pipeline_skips_a_nan_step_as_the_reference_does(tmp_path):
    raw = _raw(tmp_path / "pipeline", 3, {"kind": "nan_grad", "batch": 1})
    summary = spawn_gloo(train_from_dict, 2, (raw, True))[0]
    records = _records(tmp_path / "pipeline")
    assert [r["skipped"] for r in records] == [False, True, False] and summary["skipped_steps"] == 1
    assert math.isnan(records[1]["grad_norm"])
    reference = _reference(raw, tmp_path / "ref")
    ref_summary = _train_one_thread(reference)
    assert ref_summary.skipped_steps == 1
    assert_losses_match([r["loss"] for r in records], ref_summary.losses)
    params = final_params(tmp_path / "pipeline")
    for name, value in reference.engine.model.state_dict().items():
        torch.testing.assert_close(params[name], value, rtol=1e-5, atol=1e-7)


def _spike_raw(run_dir, **run) -> dict:
    """6 steps, checkpoints every 2, a spike (losses x10) injected on batch 4, i.e. step 5: the run
    rolls back to step 4 and trains steps 5 and 6 on batches 5 and 6."""
    return _raw(
        run_dir,
        6,
        {"kind": "loss_spike", "batch": 4},
        spike_policy="rollback",
        spike_window=2,
        spike_factor=3.0,
        **run,
    )


def test_pipeline_rolls_back_a_loss_spike_and_skips_its_data_as_the_reference_does(tmp_path):
    raw = _spike_raw(tmp_path / "pipeline")
    summary = spawn_gloo(train_from_dict, 2, (raw, True))[0]
    assert [(r["step"], r["to_step"]) for r in summary["rollbacks"]] == [(5, 4)]
    records = _records(tmp_path / "pipeline")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # the spiked step's record was dropped
    # the checkpoints after the rollback record that one batch was skipped
    meta = read_meta(list_checkpoints(str(tmp_path / "pipeline"))[-1][1])
    assert meta.step == 6 and meta.extra["data_skip"] == 1
    assert meta.samples_consumed == 7 * raw["data"]["global_batch"]

    reference = _reference(raw, tmp_path / "ref")
    ref_summary = _train_one_thread(reference)
    assert [(r["step"], r["to_step"]) for r in ref_summary.rollbacks] == [(5, 4)]
    assert_losses_match([r["loss"] for r in records], ref_summary.losses)
    # steps 5 and 6 trained on batches 5 and 6: the straight run's losses at steps 1-4, and no spike
    straight = reference_run(_raw(tmp_path / "unused", 6, None), tmp_path / "straight")
    assert_losses_match(ref_summary.losses[:4], straight.losses[:4])
    assert max(ref_summary.losses[4:]) < 3.0 * min(ref_summary.losses[:4])


def test_a_spike_past_max_rollbacks_ends_the_run_naming_the_step(tmp_path):
    raw = _raw(
        tmp_path / "unused",
        3,
        {"kind": "loss_spike", "batch": 2},
        spike_policy="rollback",
        spike_window=2,
        max_rollbacks=0,
    )
    trainer = _reference(raw, tmp_path / "ref")
    with pytest.raises(BadStepError, match=r"loss spike at step 3 .*run\.max_rollbacks=0"):
        trainer.train()
