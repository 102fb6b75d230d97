"""TrainConfig: sections are validated with dotted field names, and paths are made absolute for
Ray workers, before any work starts."""

from __future__ import annotations

import dataclasses
import os

import pytest
from moeforge.platform.config import TrainConfig
from moeforge.platform.config.builder import ConfigError
from moeforge.platform.config.train import _SECTIONS

TINY = {
    "num_hidden_layers": 2,
    "first_k_dense_replace": 1,
    "n_routed_experts": 4,
    "n_group": 2,
    "topk_group": 1,
    "num_experts_per_tok": 2,
}


@pytest.mark.parametrize(
    "values, message",
    [
        ({"model": TINY, "paralel": {}}, "paralel: unknown config section"),
        ({"model": TINY, "parallel": {"pp": 0}}, "parallel.pp: must be >= 1"),
        ({"model": TINY, "optim": {"lr": -1.0}}, "optim.lr: must be positive"),
        ({"model": {**TINY, "n_group": 3}}, "n_routed_experts (4) must be divisible by n_group (3)"),
        ({"run": {}}, "model: missing"),
        ({"model": {**TINY, "n_group": 8.0}}, "model.n_group: expected int, got 8.0"),
        ({"model": {**TINY, "arch": "dense_gqa"}}, "model.arch: moeforge-train trains deepseek_v3 models"),
        ({"model": TINY, "run": {"steps": "abc"}}, "run.steps: expected int, got 'abc'"),
        ({"model": TINY, "run": {"name": 7}}, "run.name: expected str, got 7"),
        ({"model": TINY, "parallel": {"pp": 2.5}}, "parallel.pp: expected int, got 2.5"),
        (
            {"model": TINY, "parallel": {"layers_per_stage": "2,2"}},
            "parallel.layers_per_stage: expected list[int] | None",
        ),
        (
            {"model": TINY, "parallel": {"layers_per_stage": [1, "a"]}},
            "parallel.layers_per_stage[1]: expected int",
        ),
        ({"model": TINY, "debug": {"fault_injection": [1]}}, "debug.fault_injection: expected dict"),
        ({"model": TINY, "parallel": 2}, "parallel: expected ParallelConfig, got 2"),
        ({"model": TINY, "optim": {"lr": "fast"}}, "optim.lr: expected float, got 'fast'"),
        ({"model": TINY, "optim": {"betas": [0.9, "x"]}}, "optim.betas[1]: expected float, got 'x'"),
        ({"model": TINY, "precision": {"fp8_linear": "no"}}, "precision.fp8_linear: expected bool, got 'no'"),
        ({"model": TINY, "data": {"path": 3}}, "data.path: expected str | None, got 3"),
        ({"model": TINY, "tracking": {"log_timeline": 1}}, "tracking.log_timeline: expected bool, got 1"),
        ({"model": TINY, "checkpoint": {"keep": 1.0}}, "checkpoint.keep: expected int, got 1.0"),
        (
            {"model": TINY, "checkpoint": {"nope": 1}},
            "checkpoint.nope: unknown key (known: async, async_failure, every, keep, max_failures, resume)",
        ),
        (
            {
                "model": TINY,
                "parallel": {"schedule": "dualpipe", "pp": 2, "microbatches": 3},
                "data": {"global_batch": 8},
            },
            "data.global_batch (8) must be divisible by parallel.microbatches * parallel.dp (3)",
        ),
        (
            {"model": TINY, "parallel": {"zero_bucket_elements": 3}},
            "parallel.zero_bucket_elements: must be a positive even number of elements, got 3",
        ),
        (
            {"model": TINY, "parallel": {"schedule": "1f1b", "pp": 2}, "resources": {"gpus_per_worker": 0.5}},
            "resources.gpus_per_worker: must be a whole number of GPUs with NCCL (parallel.backend=auto), got 0.5",
        ),
    ],
)
def test_bad_values_name_the_field(values, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict(values)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_gpu_fraction_is_refused_only_where_nccl_would_share_a_gpu():
    """NCCL refuses two ranks on one GPU; gloo, and the one-process loop, have no such rule."""
    for parallel, gpus in (
        ({"schedule": "1f1b", "pp": 2, "backend": "gloo"}, 0.5),
        ({"schedule": "single"}, 0.5),
        ({"schedule": "1f1b", "pp": 2, "backend": "nccl"}, 2.0),
    ):
        cfg = TrainConfig.from_dict({"model": TINY, "parallel": parallel, "resources": {"gpus_per_worker": gpus}})
        assert cfg.resources.gpus_per_worker == gpus
    with pytest.raises(ConfigError, match="resources.gpus_per_worker: must be a whole number"):
        TrainConfig.from_dict(
            {
                "model": TINY,
                "parallel": {"schedule": "1f1b", "pp": 2, "backend": "nccl"},
                "resources": {"gpus_per_worker": 1.5},
            }
        )


def test_nccl_without_gpus_is_refused_before_any_worker_starts():
    """backend=nccl on CPU workers would fail inside every Ray worker ("no NCCL built in"), after
    the cluster and the workers started: refused with the config instead."""
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"model": TINY, "parallel": {"schedule": "dualpipe", "pp": 2, "backend": "nccl"}})
    assert str(err.value) == (
        "parallel.backend: nccl runs on GPUs, and resources.gpus_per_worker is 0: give the workers GPUs "
        "(resources.gpus_per_worker=1), or use backend=gloo (or auto) on CPUs"
    )


def test_every_section_round_trips_through_the_builder():
    """Each section's defaults, as YAML would hold them (tuples as lists), build back to the same
    config: every annotation in platform/config has a builder rule and every default fits it."""
    cfg = TrainConfig.from_dict({"model": TINY, "parallel": {"layers_per_stage": [1, 1]}})
    values = dataclasses.asdict(cfg)
    values["optim"]["betas"] = list(values["optim"]["betas"])
    again = TrainConfig.from_dict(values)
    assert again == cfg and again.optim.betas == (0.9, 0.95)
    assert [f.name for f in dataclasses.fields(TrainConfig)] == ["model", *_SECTIONS]


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
