"""Waiting for resources, and a run that makes Ray's autoscaler add nodes.

- A run whose resources never arrive fails after `cluster.wait_s`, with one message saying what it
  asked for and what the cluster has (on the session cluster, with a resource no node carries);
  without `parallel.wait_for_autoscaler` it is refused at once.
- Scale-up: Ray's real autoscaler over fake nodes on this machine (the recipe in FACTS.md:
  `ray.cluster_utils.AutoscalingCluster` itself runs `ray stop --force`, which would end every Ray
  process here, and needs a config missing from the wheel). The head carries no CPUs; the one
  worker node type (min 0, max 2) carries {"CPU": 1, "moeforge_worker": 1}. A DualPipe pp=2 run whose
  workers each need one `moeforge_worker` (`parallel.worker_resources`) starts on a cluster without
  a single worker node: the autoscaler adds two, the run trains with falling loss, one rank on each
  node, and after the idle timeout (6 s) the nodes are removed again. Ray's node table (GCS) is
  the witness.

The autoscaling cluster is the test's own: a `ray start --head --block` process in its own process
group, with its own temp dir, GCS port (the fake nodes are pointed at it through the provider's
`gcs_address`) and auth token; the driver runs in a subprocess joined to it through RAY_ADDRESS, so
the session cluster of conftest.py is never touched. Teardown ends that process group only.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from moeforge.model.config import ConfigError
from moeforge.platform.config import ParallelConfig, TrainConfig
from moeforge.platform.launch.cluster_check import check_cluster_fits, describe_shortfall, worker_bundle
from moeforge.platform.launch.cluster_wait import START_TIMEOUT_ENV
from moeforge.platform.launch.ray_train import launch_training
from pipeline_cases import pipeline_config, tiny_model
from test_placement import run_in_own_process

BIN = os.path.dirname(sys.executable)  # the venv's bin: `ray`
WORKER_RESOURCE = "moeforge_worker"
IDLE_TIMEOUT_MIN = 0.1  # 6 s


# ---- configuration --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "section, values, message",
    [
        ("cluster", {"wait_s": 0}, "cluster.wait_s: must be positive"),
        ("cluster", {"placement_strategy": "CLOSE"}, "cluster.placement_strategy: must be one of"),
        ("cluster", {"wait": 5}, "cluster.wait: unknown key (known: placement_strategy, wait_s)"),
        (
            "parallel",
            {"worker_resources": {"CPU": 1}},
            "parallel.worker_resources: names a custom Ray resource",
        ),
        ("parallel", {"worker_resources": {"x": 0}}, "parallel.worker_resources.x: must be positive"),
        ("parallel", {"worker_resources": {"x": "1"}}, "parallel.worker_resources.x: expected float"),
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
    par = ParallelConfig(schedule="1f1b", pp=2, dp=2, worker_resources={WORKER_RESOURCE: 1})
    assert worker_bundle(par) == {"CPU": 1.0, WORKER_RESOURCE: 1.0}
    check_cluster_fits(par, {"CPU": 4.0, WORKER_RESOURCE: 4.0})
    with pytest.raises(ConfigError) as err:
        check_cluster_fits(par, {"CPU": 8.0, WORKER_RESOURCE: 2.0})
    assert str(err.value).startswith(
        f"parallel: the run needs 4 {WORKER_RESOURCE} (pp=2 x dp=2 = 4 workers x 1 {WORKER_RESOURCE}, "
        f"parallel.worker_resources.{WORKER_RESOURCE}), the cluster has 2;"
    )
    text = describe_shortfall(par, {"CPU": 8.0}, {"CPU": 3.0})
    assert text == (
        "the run needs 4 CPUs (pp=2 x dp=2 = 4 workers x 1 CPU, parallel.cpus_per_worker), the cluster "
        f"has 8 (3 free); 4 {WORKER_RESOURCE} (pp=2 x dp=2 = 4 workers x 1 {WORKER_RESOURCE}, "
        f"parallel.worker_resources.{WORKER_RESOURCE}), the cluster has 0 (0 free)"
    )


# ---- waiting for resources that never arrive (the session cluster) --------------------------------
def _missing_resource_config(run_dir, **parallel) -> dict:
    raw = pipeline_config(
        run_dir, "1f1b", 2, 1, 2, zero_stage=0, worker_resources={"no_such_node": 1}, **parallel
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
    assert "the run needs 2 CPUs (pp=2 x dp=1 = 2 workers x 1 CPU, parallel.cpus_per_worker)" in message
    assert "2 no_such_node (pp=2 x dp=1 = 2 workers x 1 no_such_node, parallel.worker_resources" in message
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


# ---- scale-up on an autoscaling cluster -----------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _autoscaling_config(gcs_address: str) -> dict:
    """A fake-multinode cluster config (the fields Ray's launcher schema needs, FACTS.md)."""
    return {
        "cluster_name": "moeforge-autoscaling-test",
        "max_workers": 2,
        "upscaling_speed": 10.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,  # else the fake nodes look for a GCS on the default port 6379
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "worker": {
                "resources": {"CPU": 1, WORKER_RESOURCE: 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _stop_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the head's process group (the fake nodes are its children), SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            proc.poll()
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.25)
    proc.wait(timeout=10)


def _tail(path: str, chars: int = 3000) -> str:
    with open(path) as f:
        return f.read()[-chars:]


def _wait_for_gcs(proc: subprocess.Popen, ip: str, port: int, log_path: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{_tail(log_path)}")
        try:
            socket.create_connection((ip, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"no GCS at {ip}:{port} after {timeout_s:.0f}s:\n{_tail(log_path)}")
            time.sleep(0.5)


@pytest.fixture
def autoscaling_head():
    """A `ray start --head` with the autoscaler over fake nodes; yields the client's environment
    (RAY_ADDRESS: its GCS, and its auth token)."""
    import ray._private.services

    temp_dir = tempfile.mkdtemp(prefix="mf-as-")  # short: Ray's socket paths must fit 107 bytes
    token_path = os.path.join(temp_dir, "auth_token")
    with open(token_path, "w") as f:
        f.write(secrets.token_hex(32))
    os.chmod(token_path, 0o600)
    ip, port = ray._private.services.get_node_ip_address(), _free_port()
    address = f"{ip}:{port}"
    config_path = os.path.join(temp_dir, "autoscaling.json")
    with open(config_path, "w") as f:
        json.dump(_autoscaling_config(address), f)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(
        PATH=BIN + os.pathsep + env.get("PATH", ""),  # the fake nodes' workers run the venv's python
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=token_path,
        OMP_NUM_THREADS="1",
    )
    head_env = {**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_TMPDIR": temp_dir}
    cmd = [
        os.path.join(BIN, "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=0",
        "--include-dashboard=false", f"--temp-dir={temp_dir}", "--disable-usage-stats",
        f"--autoscaling-config={config_path}", f"--ray-client-server-port={_free_port()}",
        f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
    ]  # fmt: skip
    log_path = os.path.join(temp_dir, "head.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            _wait_for_gcs(proc, ip, port, log_path)
            yield {**env, "RAY_ADDRESS": address}
        finally:
            _stop_group(proc)
            shutil.rmtree(temp_dir, ignore_errors=True)


STEPS = 2  # enough to see the run train on the added nodes


def _drive(spec_path: str) -> None:
    """Subprocess joined to the autoscaling cluster (RAY_ADDRESS): the node table before, a pp=2 run
    that needs the worker-only resource, the node table after it and once the idle nodes are gone."""
    import ray
    from moeforge.platform.launch.ray_connection import connect_ray

    def worker_nodes(alive: bool | None = None) -> list[str]:
        """Every node but the head's (the driver joined the head: no other node existed then)."""
        return [n["NodeID"] for n in ray.nodes() if n["NodeID"] != head and alive in (None, n["Alive"])]

    with open(spec_path) as f:
        spec = json.load(f)
    connect_ray()
    head = ray.get_runtime_context().get_node_id()
    before = worker_nodes(alive=True)
    raw = pipeline_config(
        spec["run_dir"],
        "dualpipe",
        2,
        1,
        4,
        zero_stage=0,
        worker_resources={WORKER_RESOURCE: 1},
        wait_for_autoscaler=True,  # the cluster has no moeforge_worker at all yet
    )
    raw["run"]["steps"] = STEPS
    raw["optim"].update(lr=3e-3, warmup_steps=1)
    raw["cluster"] = {"wait_s": 120}
    start = time.monotonic()
    summary = launch_training(TrainConfig.from_dict(raw), raw)
    trained_s = time.monotonic() - start
    during = worker_nodes()
    deadline = time.monotonic() + 60  # idle timeout 6 s, autoscaler updates every second
    while worker_nodes(alive=True) and time.monotonic() < deadline:
        time.sleep(1)
    out = {
        "before": before,
        "during": during,
        "after": worker_nodes(alive=True),
        "removed": worker_nodes(alive=False),
        "summary": summary,
        "trained_s": trained_s,
        "idle_removal_s": time.monotonic() - start - trained_s,
    }
    with open(spec["out"], "w") as f:
        json.dump(out, f)


def test_autoscaler_adds_nodes_for_a_run_and_removes_them_when_idle(autoscaling_head, tmp_path):
    run_dir = tmp_path / "run"
    result = run_in_own_process(
        __file__, {"run_dir": str(run_dir)}, tmp_path, timeout_s=240, env=autoscaling_head
    )
    print(
        f"trained in {result['trained_s']:.0f}s (with the scale-up), idle nodes removed "
        f"{result['idle_removal_s']:.0f}s later"
    )
    assert result["before"] == []  # no worker node when the run was launched
    assert len(result["during"]) == 2  # the autoscaler added two
    summary = result["summary"]
    assert summary["steps"] == STEPS and summary["final_loss"] < summary["first_loss"]
    placement = json.loads((run_dir / "placement.json").read_text())
    assert sorted(row["node_id"] for row in placement["ranks"]) == sorted(result["during"])  # one rank each
    assert "waiting up to 120s (cluster.wait_s) for the cluster to host 2 workers" in result["console"]
    # ... and removed them once idle
    assert result["after"] == [] and sorted(result["removed"]) == sorted(result["during"])


if __name__ == "__main__":  # the subprocess of the scale-up test
    _drive(sys.argv[1])
