"""DualPipe's overlapped F&B pair on phase programs (platform/runtime/chunk_program.py).

With parallel.chunk_phases every stage chunk runs as a program of phases split at its MoE
all-to-alls; parallel.overlap interleaves the forward and backward programs of each F&B pair phase
by phase, so one micro-batch's all-to-all travels while the other computes. The two micro-batches
are independent, so overlap on and off must agree bit for bit (losses, gradient norms, every
parameter), and both must match the single-process loop as every pipeline case does."""

from __future__ import annotations

import pytest
import torch
from moeforge.model.config import ConfigError
from moeforge.platform.config import TrainConfig
from moeforge.platform.runtime.local_spawn import spawn_gloo
from moeforge.platform.runtime.pipeline_run import train_from_dict
from pipeline_cases import assert_matches_reference, pipeline_config, pipeline_record, reference_run


@pytest.mark.parametrize("schedule", ["dualpipe", "dualpipev"])
def test_overlap_on_and_off_are_bit_identical_and_match_reference(tmp_path, schedule):
    records = {}
    for overlap in (False, True):
        raw = pipeline_config(
            tmp_path / f"overlap_{overlap}", schedule, 2, 2, 4, 0, ep=2, chunk_phases=True, overlap=overlap
        )
        spawn_gloo(train_from_dict, 4, (raw, True))
        records[overlap] = pipeline_record(tmp_path / f"overlap_{overlap}")
    off, on = records[False], records[True]
    assert on.losses == off.losses
    assert on.grad_norms == off.grad_norms
    assert on.params.keys() == off.params.keys()
    for name, value in off.params.items():
        assert torch.equal(on.params[name], value), name
    assert_matches_reference(on, reference_run(raw, tmp_path / "reference"), label=f"{schedule} overlap ep=2")


def test_overlap_needs_phase_programs(tmp_path):
    raw = pipeline_config(tmp_path, "dualpipe", 2, 1, 4, 0, overlap=True)
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict(raw)
    assert (
        str(err.value) == "parallel.overlap: interleaves phase programs: set parallel.chunk_phases=true too"
    )
