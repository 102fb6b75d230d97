"""DualPipe's overlapped F&B pair on phase programs (platform/engine/chunk_program.py).

With parallel.chunk_phases every stage chunk runs as a program of phases split at its MoE
all-to-alls; parallel.overlap interleaves the forward and backward programs of each F&B pair phase
by phase, so one micro-batch's all-to-all travels while the other computes. The two micro-batches
are independent, so overlap on and off must agree bit for bit (losses, gradient norms, every
step-1 gradient and parameter), and both must match the single-process loop as every pipeline case
does."""

from __future__ import annotations

import json

import pytest
import torch
from moeforge.platform.config import TrainConfig
from moeforge.platform.config.builder import ConfigError
from moeforge.platform.engine.chunk_program import run_pair
from moeforge.platform.launch.local_spawn import spawn_gloo
from moeforge.platform.train.pipeline import train_from_dict
from pipeline_cases import (
    assert_matches_reference,
    dump_grads,
    pipeline_config,
    pipeline_record,
    read_metrics,
    reference_run,
)


def _recording(name: str, phases: int, log: list):
    for k in range(phases):
        log.append(f"{name}{k}")
        if k < phases - 1:
            yield
    return name


@pytest.mark.parametrize(
    "order, expected",
    [("backward_first", ["B0", "F0", "B1", "F1", "F2"]), ("forward_first", ["F0", "B0", "F1", "B1", "F2"])],
)
def test_pair_runs_phases_alternately_in_the_configured_order(order, expected):
    log, forward_done = [], []
    f, b = run_pair(_recording("F", 3, log), _recording("B", 2, log), forward_done.append, order)
    assert (f, b) == ("F", "B")
    assert log == expected
    assert forward_done == ["F"]
    with pytest.raises(ValueError, match="parallel.overlap_order"):
        run_pair(_recording("F", 1, []), _recording("B", 1, []), None, "sideways")


# both orders of the pair, one per schedule
@pytest.mark.parametrize("schedule, order", [("dualpipe", "forward_first"), ("dualpipev", "backward_first")])
def test_overlap_on_and_off_are_bit_identical_and_match_reference(tmp_path, monkeypatch, schedule, order):
    dump_grads(monkeypatch)
    records = {}
    for overlap in (False, True):
        raw = pipeline_config(
            tmp_path / f"overlap_{overlap}",
            schedule,
            2,
            2,
            4,
            0,
            ep=2,
            chunk_phases=True,
            overlap=overlap,
            overlap_order=order,
        )
        spawn_gloo(train_from_dict, 4, (raw, True))
        records[overlap] = pipeline_record(tmp_path / f"overlap_{overlap}")
    # the phase programs' all-to-alls are timed: spans on every rank's timeline, waits in the metrics
    with open(tmp_path / "overlap_True" / "timeline.json") as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    for rank in range(4):
        assert any(e["cat"] == "A2A" and e["tid"] == rank for e in events), rank
    assert all("exposed_a2a_s" in m for m in read_metrics(tmp_path / "overlap_True"))
    off, on = records[False], records[True]
    assert on.losses == off.losses
    assert on.grad_norms == off.grad_norms
    assert on.params.keys() == off.params.keys() and on.grads.keys() == off.grads.keys()
    for name, value in off.params.items():
        assert torch.equal(on.params[name], value), name
    for name, value in off.grads.items():
        assert torch.equal(on.grads[name], value), f"step-1 gradient of {name}"
    assert_matches_reference(on, reference_run(raw, tmp_path / "reference"), label=f"{schedule} overlap ep=2")


def test_overlap_needs_phase_programs(tmp_path):
    raw = pipeline_config(tmp_path, "dualpipe", 2, 1, 4, 0, overlap=True)
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict(raw)
    assert (
        str(err.value) == "parallel.overlap: interleaves phase programs: set parallel.chunk_phases=true too"
    )
