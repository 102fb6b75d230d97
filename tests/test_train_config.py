"""TrainConfig: sections are validated with dotted field names, and paths are made absolute for
Ray workers, before any work starts."""

from __future__ import annotations

import os

import pytest
from moeforge.model.config import ConfigError
from moeforge.platform.config import TrainConfig

TINY = {"num_hidden_layers": 2, "first_k_dense_replace": 1, "n_routed_experts": 4, "n_group": 2,
        "topk_group": 1, "num_experts_per_tok": 2}


@pytest.mark.parametrize(
    "values, message",
    [
        ({"model": TINY, "paralel": {}}, "paralel: unknown config section"),
        ({"model": TINY, "parallel": {"pp": 0}}, "parallel.pp: must be >= 1"),
        ({"model": TINY, "optim": {"lr": -1.0}}, "optim.lr: must be positive"),
        ({"model": {**TINY, "n_group": 3}}, "n_routed_experts (4) must be divisible by n_group (3)"),
        ({"run": {}}, "model: missing"),
        (
            {"model": TINY, "parallel": {"schedule": "dualpipe", "pp": 2, "microbatches": 3}, "data": {"global_batch": 8}},
            "data.global_batch (8) must be divisible by parallel.microbatches * parallel.dp (3)",
        ),
    ],
)
def test_bad_values_name_the_field(values, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict(values)
    assert message in str(err.value)


def test_local_paths_become_absolute_and_s3_stays(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig.from_dict(
        {"model": TINY, "run": {"dir": "runs/x"}, "data": {"source": "tokens", "path": "data/tok"}}
    ).with_absolute_paths()
    assert cfg.run.dir == os.path.join(str(tmp_path), "runs/x")
    assert cfg.data.path == os.path.join(str(tmp_path), "data/tok")
    remote = TrainConfig.from_dict(
        {"model": TINY, "run": {"dir": "s3://bucket/run"}, "data": {"source": "tokens", "path": "s3://b/t"}}
    ).with_absolute_paths()
    assert remote.run.dir == "s3://bucket/run" and remote.data.path == "s3://b/t"
