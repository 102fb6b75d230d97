"""`ray job submit --working-dir <repo> -- moeforge-train ...` to an autoscaling cluster.

The cluster is this module's own: a `ray start --head --block` process in its own process group, with
its own --temp-dir, ports and token file, so it never meets the session cluster of conftest.py (or a
colleague's). Teardown signals only that process group: SIGTERM, then SIGKILL after a grace period.

Its head carries no CPUs and runs Ray's real autoscaler over fake nodes on this machine (the
recipe of `_autoscaling_config`: `ray.cluster_utils.AutoscalingCluster` itself runs `ray stop --force`, which
would end every Ray process here, and needs a config missing from the wheel). The one worker node
type (min 0, max 2) carries {"CPU": 1, "moeforge_worker": 1}. The submitted DualPipe pp=2 run, whose
workers each need one `moeforge_worker` (`resources.worker_resources`), starts on a cluster without a
single worker node: the autoscaler adds two, the run trains on them, one rank on each, into an
absolute run.dir, and after the idle timeout (6 s) the nodes are removed again. The head's node table
(its State API) is the witness.

Token authentication: a local head enables it, and both sides must agree on the token. The test
writes a fresh token file and hands RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH to the head (and
through it to the job) and to the `ray job submit` client, instead of ~/.ray/auth_token.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest
import yaml

from tests.conftest import REPO_ROOT, free_port

BIN = os.path.dirname(sys.executable)  # the venv's bin: `ray` and `moeforge-train`
RAY = os.path.join(BIN, "ray")
EXPERIMENT = "tiny_cpu_dualpipe"  # 2 Ray Train workers inside the submitted job
STEPS = 2
WORKER_RESOURCE = "moeforge_worker"
IDLE_TIMEOUT_MIN = 0.1  # 6 s


def _ray_env(token_path: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),  # the job's entrypoint finds moeforge-train
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": token_path,
        "OMP_NUM_THREADS": "1",
    }
    for inherited in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "HYDRA_FULL_ERROR"):
        env.pop(inherited, None)
    return env


def _stop_group(proc: subprocess.Popen, grace_s: float = 2.0) -> None:
    """SIGTERM the head's process group, SIGKILL what is left after `grace_s`.

    (On SIGTERM `ray start --block` and the raylet begin a graceful stop that, measured here, still
    has not finished after 25 s, so the grace period is kept short: the temp dir is removed after.)"""
    if proc.poll() is not None and not _group_alive(proc.pid):
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _group_alive(proc.pid):
        time.sleep(0.5)
        proc.poll()  # reap the group leader
    if _group_alive(proc.pid):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for_dashboard(url: str, proc: subprocess.Popen, log_path: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log_path) as f:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{f.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/api/version", timeout=2):
                return
        except urllib.error.HTTPError:  # it answers (401: the token is checked): it is up
            return
        except OSError:  # not listening yet
            time.sleep(1)
    with open(log_path) as f:
        pytest.fail(f"the dashboard at {url} did not come up in {timeout_s}s:\n{f.read()[-3000:]}")


def _autoscaling_config(gcs_address: str) -> dict:
    """A fake-multinode cluster config (the fields Ray's launcher schema needs)."""
    return {
        "cluster_name": "moeforge-job-test",
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


@pytest.fixture(scope="module")
def ray_head():
    """An autoscaling `ray start --head` on this machine; yields (dashboard URL, client env, temp dir)."""
    import ray._private.services

    temp_dir = tempfile.mkdtemp(prefix="mf-rayjob-")  # short: Ray's socket paths must fit 107 bytes
    token_path = os.path.join(temp_dir, "auth_token")
    with open(token_path, "w") as f:
        f.write(secrets.token_hex(32))
    os.chmod(token_path, 0o600)
    env = _ray_env(token_path)
    ip, port = ray._private.services.get_node_ip_address(), free_port()
    config_path = os.path.join(temp_dir, "autoscaling.json")
    with open(config_path, "w") as f:
        json.dump(_autoscaling_config(f"{ip}:{port}"), f)
    dashboard_port = free_port()
    cmd = [
        RAY, "start", "--head", "--block",
        "--num-cpus=0", "--num-gpus=0",
        f"--port={port}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
        f"--temp-dir={temp_dir}",
        f"--autoscaling-config={config_path}",
        "--disable-usage-stats",
    ]  # fmt: skip
    log_path = os.path.join(temp_dir, "ray-start.log")
    url = f"http://127.0.0.1:{dashboard_port}"
    # The suite's own local cluster runs beside this head, and Ray Train's placement-group cleaner
    # (an actor on this head) finds "multiple active Ray instances" when it looks its State API up
    # by auto-detection: a traceback in the job's console. Naming the API server, as a user with
    # two clusters on one machine would, makes the lookup unambiguous.
    head_env = {
        **env,
        "RAY_API_SERVER_ADDRESS": url,
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_TMPDIR": temp_dir,
    }
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            _wait_for_dashboard(url, proc, log_path)
            yield url, env, temp_dir
        finally:
            _stop_group(proc)
            shutil.rmtree(temp_dir, ignore_errors=True)


def _unpacked_working_dirs(temp_dir: str) -> list[str]:
    """The job packages the head unpacked (under <temp-dir>/session_*/runtime_resources)."""
    found = []
    for root, dirs, _files in os.walk(temp_dir):
        if os.path.basename(root) == "working_dir_files":
            found += [os.path.join(root, d) for d in dirs]
            dirs.clear()
    return found


def _get(url: str, token_path: str | None) -> dict:
    """GET a JSON answer from the head's dashboard, with the token (or, to see it refused, without)."""
    request = urllib.request.Request(url)
    if token_path is not None:
        with open(token_path) as f:
            request.add_header("Authorization", f"Bearer {f.read().strip()}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _job_info(url: str, submission_id: str, token_path: str | None) -> dict:
    return _get(f"{url}/api/jobs/{submission_id}", token_path)


def _worker_nodes(url: str, token_path: str) -> dict[str, str]:
    """Every node but the head, by id, with its state (ALIVE or DEAD), from the State API."""
    answer = _get(f"{url}/api/v0/nodes?limit=100&detail=true", token_path)
    rows = answer["data"]["result"]["result"]
    return {row["node_id"]: row["state"] for row in rows if not row["is_head_node"]}


# Recurring third-party lines a run's console must not show: Ray Train's placement-group
# cleaner failing to query the State API every second, torch's all_gather_into_tensor deprecation
# at every log step (DeepSpeed's call), DeepSpeed's comm-op build line and untested-optimizer
# warning on every worker.
NOISE = (
    "PlacementGroupCleaner",
    "Failed to query",
    "FutureWarning",
    "is deprecated",
    "built successfully",
    "untested optimizer",
)


def assert_quiet_console(output: str, copies: int = 1) -> None:
    """No known noise, and no line from outside moeforge repeated more than twice (Ray's per-actor
    prefix keeps the pid, so one line from each of the two workers passes; timestamps are
    dropped so a line logged at every step counts as the same line). `copies`: how many times the
    console carries each line a worker prints once."""
    lines = [line for line in output.splitlines() if line.strip()]
    for word in NOISE:
        hits = [line for line in lines if word in line]
        assert not hits, f"{len(hits)} console lines with {word!r}:\n" + "\n".join(hits[:40])
    counts: dict[str, int] = {}
    for line in lines:
        if "[rank " in line or not re.search(r"[A-Za-z]", line):  # moeforge's own lines; rules
            continue
        key = re.sub(r"\d{4}-\d\d-\d\d[ T][\d:,.]+", "<time>", line)
        counts[key] = counts.get(key, 0) + 1
    repeated = {line: n for line, n in counts.items() if n > 2 * copies}
    assert not repeated, repeated


def test_ray_job_submit_trains_into_an_absolute_run_dir(ray_head, tmp_path):
    url, env, temp_dir = ray_head
    token_path = env["RAY_AUTH_TOKEN_PATH"]
    assert _worker_nodes(url, token_path) == {}  # no worker node when the job is submitted
    run_dir = tmp_path / "run"
    submission_id = f"moeforge-test-{secrets.token_hex(4)}"
    submit = [
        RAY, "job", "submit", "--address", url, "--submission-id", submission_id,
        "--working-dir", REPO_ROOT, "--",
        "moeforge-train", f"experiment={EXPERIMENT}", f"run.steps={STEPS}", "run.log_every=1",
        "run.eval_every=0", f"run.dir={run_dir}", "optim.lr=3e-3", "optim.warmup_steps=1",
        f"resources.worker_resources={{{WORKER_RESOURCE}: 1}}", "resources.wait_for_autoscaler=true",
        "cluster.wait_s=120",
    ]  # fmt: skip
    try:
        proc = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired:  # leave no job running on the head; then fail
        stop = [RAY, "job", "stop", "--address", url, submission_id]
        subprocess.run(stop, env=env, capture_output=True, timeout=60, check=False)
        raise
    logs = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, logs

    # The job's record on the head says SUCCEEDED (REST API, with the token; without it: 401).
    assert _job_info(url, submission_id, token_path)["status"] == "SUCCEEDED"
    with pytest.raises(urllib.error.HTTPError) as refused:
        _job_info(url, submission_id, token_path=None)
    assert refused.value.code == 401
    assert f"step {STEPS}/{STEPS}" in proc.stdout  # the job's console streamed back to the client
    assert "waiting up to 120s (cluster.wait_s) for the cluster to host 2 workers" in proc.stdout
    # The job's console (stderr: the client's upload notes). On this one-machine cluster every
    # raylet's log monitor reads the same session log directory, so a worker's line reaches the
    # console once per raylet up at the time: rank 0's last step line, printed once, says how often.
    workers = [line for line in proc.stdout.splitlines() if "(RayTrainWorker pid=" in line]
    assert workers and not [line for line in workers if "\x1b[" in line]  # a log file: no colour codes
    copies = proc.stdout.count(f"[rank 0] step {STEPS}/{STEPS} ")
    assert 1 <= copies <= 3, copies
    assert_quiet_console(proc.stdout, copies)

    # The run's records are in run.dir, not in the job's temporary working directory.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["run"]["dir"] == str(run_dir) and config["run"]["name"] == EXPERIMENT
    assert config["parallel"]["schedule"] == "dualpipe" and config["parallel"]["pp"] == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["final_loss"] < summary["first_loss"]
    trace = json.loads((run_dir / "timeline.json").read_text())  # the measured pipeline timeline
    assert {e["tid"] for e in trace["traceEvents"] if e.get("ph") == "X"} == {0, 1}  # both ranks ran

    # What was uploaded: the sources and configs, without .git, .venv or local runs.
    packages = _unpacked_working_dirs(temp_dir)
    assert packages, f"no unpacked working_dir under {temp_dir}"
    for package in packages:
        top = set(os.listdir(package))
        assert {"conf", "platform", "jobs", "pyproject.toml"} <= top, top
        assert not {".git", "runs", "wandb"} & top, top
        venv = os.path.join(package, ".venv")
        assert not os.path.isdir(venv) or os.listdir(venv) == [], os.listdir(venv)
        assert not any(name.startswith(("multirun.yaml", "metrics.jsonl")) for name in top)

    # The autoscaler added two worker nodes for the run, one rank on each, and removed them once idle.
    placement = json.loads((run_dir / "placement.json").read_text())
    used = sorted(row["node_id"] for row in placement["ranks"])
    added = _worker_nodes(url, token_path)
    assert len(added) == 2 and sorted(added) == used, (added, used)
    deadline = time.monotonic() + 60  # idle timeout 6 s, the autoscaler updates every second
    while any(state == "ALIVE" for state in added.values()) and time.monotonic() < deadline:
        time.sleep(1)
        added = _worker_nodes(url, token_path)
    assert set(added.values()) == {"DEAD"}, added
