"""Waiting for resources, on the session cluster.

- A run whose resources never arrive fails after `cluster.wait_s`, with one message saying what it
  asked for and what the cluster has (with a resource no node carries); without
  `resources.wait_for_autoscaler` it is refused at once.
- The config of both, and what the cluster has, in one vocabulary.

A run that makes Ray's autoscaler add nodes, and their removal once idle, is tests/test_job_submit.py's
(a job submitted to an autoscaling cluster of fake nodes).
"""

from __future__ import annotations

import os

import pytest
from moeforge.platform.config import ParallelConfig, ResourcesConfig, TrainConfig
from moeforge.platform.config.builder import ConfigError
from moeforge.platform.launch.cluster_check import check_cluster_fits, describe_shortfall, worker_bundle
from moeforge.platform.launch.cluster_wait import START_TIMEOUT_ENV
from moeforge.platform.launch.ray_train import launch_training
from pipeline_cases import pipeline_config, tiny_model

WORKER_RESOURCE = "moeforge_worker"


# ---- configuration --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "section, values, message",
    [
        ("cluster", {"wait_s": 0}, "cluster.wait_s: must be positive"),
        ("cluster", {"placement_strategy": "CLOSE"}, "cluster.placement_strategy: must be one of"),
        ("cluster", {"wait": 5}, "cluster.wait: unknown key (known: placement_strategy, wait_s)"),
        (
            "resources",
            {"worker_resources": {"CPU": 1}},
            "resources.worker_resources: names a custom Ray resource",
        ),
        ("resources", {"worker_resources": {"x": 0}}, "resources.worker_resources.x: must be positive"),
        ("resources", {"worker_resources": {"x": "1"}}, "resources.worker_resources.x: expected float"),
    ],
)
def test_bad_cluster_values_name_the_field(section, values, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"model": tiny_model(), section: values})
    assert message in str(err.value)


def test_cluster_defaults():
    cfg = TrainConfig.from_dict({"model": tiny_model(), "cluster": {"wait_s": 30}})
    assert cfg.cluster.wait_s == 30.0 and cfg.cluster.placement_strategy == "PACK"
    assert TrainConfig.from_dict({"model": tiny_model()}).cluster.wait_s == 600.0


# ---- what the cluster has, in one vocabulary -------------------------------------------------------
def test_custom_worker_resources_are_checked_and_described():
    par = ParallelConfig(schedule="1f1b", pp=2, dp=2)
    res = ResourcesConfig(worker_resources={WORKER_RESOURCE: 1})
    assert worker_bundle(res) == {"CPU": 1.0, WORKER_RESOURCE: 1.0}
    check_cluster_fits(par, res, {"CPU": 4.0, WORKER_RESOURCE: 4.0})
    with pytest.raises(ConfigError) as err:
        check_cluster_fits(par, res, {"CPU": 8.0, WORKER_RESOURCE: 2.0})
    assert str(err.value).startswith(
        f"parallel: the run needs 4 {WORKER_RESOURCE} (pp=2 x dp=2 = 4 workers x 1 {WORKER_RESOURCE}, "
        f"resources.worker_resources.{WORKER_RESOURCE}), the cluster has 2;"
    )
    text = describe_shortfall(par, res, {"CPU": 8.0}, {"CPU": 3.0})
    assert text == (
        "the run needs 4 CPUs (pp=2 x dp=2 = 4 workers x 1 CPU, resources.cpus_per_worker), the cluster "
        f"has 8 (3 free); 4 {WORKER_RESOURCE} (pp=2 x dp=2 = 4 workers x 1 {WORKER_RESOURCE}, "
        f"resources.worker_resources.{WORKER_RESOURCE}), the cluster has 0 (0 free)"
    )


# ---- waiting for resources that never arrive (the session cluster) --------------------------------
def _missing_resource_config(run_dir, **resources) -> dict:
    raw = pipeline_config(
        run_dir, "1f1b", 2, 1, 2, zero_stage=0, resources={"worker_resources": {"no_such_node": 1}, **resources}
    )
    raw["cluster"] = {"wait_s": 2}
    return raw


def test_a_run_whose_resources_never_arrive_fails_after_wait_s(ray_cluster, tmp_path, capsys):
    """The run says it waits, asks Ray for exactly its workers' reservation once, and when Ray
    Train's start gives up at cluster.wait_s (the only path to the `cluster.wait_s:` error) fails
    with what it asked for; the reservation is released and the driver's environment restored."""
    raw = _missing_resource_config(tmp_path / "run", wait_for_autoscaler=True)
    groups_before = set(ray_cluster.util.placement_group_table())
    start_timeout_before = os.environ.get(START_TIMEOUT_ENV)
    with pytest.raises(ConfigError) as err:
        launch_training(TrainConfig.from_dict(raw), raw)
    message = str(err.value)
    print(message)
    assert message.startswith("cluster.wait_s: the cluster could not host the run's 2 workers within 2s: ")
    assert "the run needs 2 CPUs (pp=2 x dp=1 = 2 workers x 1 CPU, resources.cpus_per_worker)" in message
    assert "2 no_such_node (pp=2 x dp=1 = 2 workers x 1 no_such_node, resources.worker_resources" in message
    assert "the cluster has 0 (0 free)" in message and "\n" not in message
    assert "waiting up to 2s (cluster.wait_s) for the cluster to host 2 workers" in capsys.readouterr().out
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    # one start, not retried: one reservation of the run's 2 worker bundles, released again
    table = ray_cluster.util.placement_group_table()
    (group,) = [g for pg_id, g in table.items() if pg_id not in groups_before]
    bundles = sorted(tuple(sorted(b.items())) for b in group["bundles"].values())
    assert bundles == [(("CPU", 1.0), ("no_such_node", 1.0))] * 2, group
    assert group["state"] == "REMOVED", group
    assert all(pg["state"] == "REMOVED" for pg in table.values())
    assert os.environ.get(START_TIMEOUT_ENV) == start_timeout_before  # the start's limit was scoped


def test_without_wait_for_autoscaler_a_missing_resource_is_refused_at_once(ray_cluster, tmp_path):
    raw = _missing_resource_config(tmp_path / "run")
    with pytest.raises(
        ConfigError, match=r"needs 2 no_such_node .* the cluster has 0; .*wait_for_autoscaler"
    ):
        launch_training(TrainConfig.from_dict(raw), raw)
