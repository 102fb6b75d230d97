"""platform.launch.ray_connection: which cluster a job joins, and how a dead one is refused.

The jobs run as a user runs them (console scripts in subprocesses), each with its own short
RAY_TMPDIR (Ray's socket paths must fit 107 bytes), so a stale `ray_current_cluster` record planted
there, or the local cluster a job starts, never meets the session cluster of conftest.py or a
colleague's.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
from moeforge.platform.config.builder import ConfigError
from moeforge.platform.launch.ray_connection import (
    QUIET_HOOK,
    RayConnectionError,
    check_ray_address,
    connect_ray,
    quiet_workers,
    reachable_address,
)
from moeforge.platform.outputs import log_filters
from moeforge.platform.outputs.log_filters import drop_log_message

from tests.conftest import free_port

BIN = os.path.dirname(sys.executable)
PREPARE = os.path.join(BIN, "moeforge-prepare")
TRAIN = os.path.join(BIN, "moeforge-train")
DEAD = "127.0.0.1:6553"  # what a crashed `ray start --head --port 6553` leaves recorded


@pytest.fixture
def ray_tmpdir():
    """A short RAY_TMPDIR of this test's own; removed afterwards."""
    path = tempfile.mkdtemp(prefix="r", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _stale_record(ray_tmpdir: str, address: str = DEAD) -> str:
    os.makedirs(os.path.join(ray_tmpdir, "ray"), exist_ok=True)
    record = os.path.join(ray_tmpdir, "ray", "ray_current_cluster")
    with open(record, "w") as f:
        f.write(address + "\n")
    return record


def _closed_port() -> int:
    return free_port()  # bound, then released: nothing listens there


def _env(ray_tmpdir: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "RAY_TMPDIR": ray_tmpdir, "OMP_NUM_THREADS": "1", **extra}
    if "RAY_ADDRESS" not in extra:
        env.pop("RAY_ADDRESS", None)
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def _corpus(tmp_path) -> str:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(2):
        (folder / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 40)
    return str(folder)


def _ray_processes(ray_tmpdir: str) -> list[str]:
    """Processes whose command line names this RAY_TMPDIR (a local cluster's GCS, raylet, workers)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if ray_tmpdir in cmdline:
            found.append(f"{proc.info['pid']}: {cmdline[:200]}")
    return found


def _assert_no_cluster_left(ray_tmpdir: str, grace_s: float = 20.0) -> None:
    deadline = time.monotonic() + grace_s
    while (left := _ray_processes(ray_tmpdir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, left


# ------------------------------------------------------------------------------------------------
# RAY_ADDRESS forms, probed without Ray
# ------------------------------------------------------------------------------------------------
def test_a_closed_port_is_refused_in_one_line_naming_the_address_and_the_fix():
    address = f"127.0.0.1:{_closed_port()}"
    with pytest.raises(RayConnectionError) as refused:
        reachable_address(address)
    message = str(refused.value)
    assert isinstance(refused.value, ConfigError)  # the jobs print it as a user error, exit 2
    assert message.startswith(f"RAY_ADDRESS={address}: no Ray cluster answers there (")
    assert "`ray start --head`" in message and "unset RAY_ADDRESS" in message
    assert "\n" not in message


def test_address_forms():
    with socket.socket() as listening:  # something answers: the address is handed to ray.init
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert reachable_address(f"127.0.0.1:{port}") == f"127.0.0.1:{port}"
        assert reachable_address(f"ray://127.0.0.1:{port}") == f"ray://127.0.0.1:{port}"
    with pytest.raises(RayConnectionError, match=r"^RAY_ADDRESS=ray://127\.0\.0\.1:\d+: no Ray cluster answers"):
        reachable_address(f"ray://127.0.0.1:{_closed_port()}")
    with pytest.raises(RayConnectionError, match=r"job server \(dashboard\) URL.*ray job submit --address"):
        reachable_address("http://127.0.0.1:8265")
    for bad in ("localhost", "127.0.0.1:port", "127.0.0.1:70000", ":6379"):
        with pytest.raises(RayConnectionError, match=rf"^RAY_ADDRESS={bad}: not a Ray address"):
            reachable_address(bad)


def test_auto_reads_the_cluster_record(ray_tmpdir, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", ray_tmpdir)
    record = os.path.join(ray_tmpdir, "ray", "ray_current_cluster")
    with pytest.raises(RayConnectionError, match=rf"^RAY_ADDRESS=auto: no running Ray cluster is recorded in {re.escape(record)};"):
        reachable_address("auto")
    _stale_record(ray_tmpdir)
    with pytest.raises(RayConnectionError, match=rf"^RAY_ADDRESS=auto \({re.escape(record)} names {DEAD}\): no Ray cluster answers"):
        reachable_address("auto")


def test_check_ray_address_probes_only_an_address_to_join(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    for unset_or_local in ("", "local"):
        monkeypatch.setenv("RAY_ADDRESS", unset_or_local)
        check_ray_address()
    monkeypatch.setenv("RAY_ADDRESS", DEAD)
    with pytest.raises(RayConnectionError):
        check_ray_address()
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # connected already: nothing to check
    check_ray_address()


def test_a_connected_session_is_kept(monkeypatch):
    import ray

    def no_init(*args, **kwargs):
        raise AssertionError("ray.init called although a session is connected")

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "init", no_init)
    monkeypatch.setenv("RAY_ADDRESS", DEAD)
    assert connect_ray(num_cpus=1) is ray


def test_a_local_cluster_starts_even_with_a_stale_record(monkeypatch, ray_tmpdir):
    """Without RAY_ADDRESS: address="local", no dashboard, and the workers' quiet hook."""
    import ray

    _stale_record(ray_tmpdir)
    monkeypatch.setenv("RAY_TMPDIR", ray_tmpdir)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    calls = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    connect_ray(num_cpus=3)
    [kwargs] = calls
    assert kwargs["address"] == "local" and kwargs["num_cpus"] == 3 and kwargs["include_dashboard"] is False
    hook = kwargs["runtime_env"]["worker_process_setup_hook"]
    assert hook == "moeforge.platform.launch.ray_connection.quiet_workers"
    assert kwargs["runtime_env"]["env_vars"] == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@pytest.fixture
def listening_address():
    """host:port where something accepts TCP connections (what reachable_address probes for)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield f"127.0.0.1:{server.getsockname()[1]}"


def _joined_init_kwargs(monkeypatch, address: str, job_config: str | None = None) -> dict:
    import ray

    monkeypatch.setenv("RAY_ADDRESS", address)
    if job_config is None:
        monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    else:
        monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", job_config)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    calls = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    connect_ray(num_cpus=3)
    [kwargs] = calls
    return kwargs


def test_a_joined_cluster_gets_the_quiet_hook_unless_the_job_brings_one(monkeypatch, listening_address):
    """A joined cluster's workers run the hook too, and keep Ray Train's preemption watcher; a job
    submitted with its own setup hook keeps that one (Ray refuses to merge two)."""
    kwargs = _joined_init_kwargs(monkeypatch, listening_address)
    assert kwargs["address"] == listening_address and "num_cpus" not in kwargs
    assert kwargs["runtime_env"] == {"worker_process_setup_hook": QUIET_HOOK}
    submitted = '{"runtime_env": {"working_dir": "/x", "worker_process_setup_hook": "theirs.hook"}}'
    assert "runtime_env" not in _joined_init_kwargs(monkeypatch, listening_address, submitted)
    plain_job = '{"runtime_env": {"working_dir": "/x"}}'
    assert _joined_init_kwargs(monkeypatch, listening_address, plain_job)["runtime_env"] == {
        "worker_process_setup_hook": QUIET_HOOK
    }


def test_a_refused_join_names_token_authentication_when_it_is_not_set(monkeypatch, listening_address):
    import ray

    def refuse(**kwargs):
        raise ConnectionError(f"Failed to connect to Ray cluster at {kwargs['address']}")

    monkeypatch.setenv("RAY_ADDRESS", listening_address)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(RayConnectionError) as err:
        connect_ray()
    assert str(err.value).endswith("set RAY_AUTH_MODE=token") and "\n" not in str(err.value)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(RayConnectionError) as err:
        connect_ray()
    assert "RAY_AUTH_MODE" not in str(err.value)


def test_worker_hook_drops_only_the_placement_group_cleaners_failed_query(caplog):
    logger = logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner")
    quiet_workers()
    quiet_workers()  # once per process, however often Ray runs it
    assert sum(isinstance(f, log_filters._DropMessage) for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to query Ray Train Controller actor state. State API may be temporarily unavailable.")
        logger.warning("Failed to clean up placement group: boom")
    assert [r.getMessage() for r in caplog.records] == ["Failed to clean up placement group: boom"]


def test_drop_log_message_by_source_file(caplog):
    logger = logging.getLogger("moeforge.test.drop")
    drop_log_message("moeforge.test.drop", "built successfully", source="deepspeed/comm/")
    with caplog.at_level(logging.INFO, logger="moeforge.test.drop"):
        logger.handle(logger.makeRecord(logger.name, logging.INFO, "/x/deepspeed/comm/torch.py", 1,
                                        "built successfully", (), None))
        logger.info("built successfully")  # from this file: kept
    assert [r.pathname for r in caplog.records] == [__file__]


# ------------------------------------------------------------------------------------------------
# The jobs, as a user runs them
# ------------------------------------------------------------------------------------------------
def test_prepare_runs_on_a_fresh_local_cluster_despite_a_stale_record(tmp_path, ray_tmpdir):
    """A bare ray.init() would retry the recorded dead GCS forever; the job starts its own cluster,
    and that cluster is gone when the job exits."""
    _stale_record(ray_tmpdir)
    out = tmp_path / "tokens"
    cmd = [PREPARE, f"inputs=[{_corpus(tmp_path)}]", f"output={out}", "vocab_size=300", "num_cpus=1",
           "val_fraction=0.0"]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(ray_tmpdir), cwd=tmp_path, capture_output=True, text=True,
                          timeout=180, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "prepare: done:" in proc.stdout and (out / "manifest.json").exists()
    assert "Failed to connect to GCS" not in proc.stderr and DEAD not in proc.stdout + proc.stderr
    _assert_no_cluster_left(ray_tmpdir)


@pytest.mark.parametrize(
    "job, args",
    [
        (PREPARE, ["vocab_size=300"]),  # inputs added below
        (TRAIN, ["experiment=tiny_cpu_dualpipe"]),  # a pipeline run: through platform.launch.ray_train
    ],
    ids=["moeforge-prepare", "moeforge-train"],
)
def test_an_unreachable_ray_address_fails_fast_in_one_line(tmp_path, ray_tmpdir, job, args):
    address = f"127.0.0.1:{_closed_port()}"
    if job == PREPARE:
        args = [*args, f"inputs=[{_corpus(tmp_path)}]", f"output={tmp_path / 'tokens'}"]
    else:
        args = [*args, f"run.dir={tmp_path / 'run'}"]
    proc = subprocess.run([job, *args], env=_env(ray_tmpdir, RAY_ADDRESS=address), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Refused by the probe before ray.init, which would retry the address for minutes, logging each
    # try: the one line below is the probe's ("no Ray cluster answers there"; ray.init's failures
    # read "could not join"), Ray logged no connection attempt, and no Ray process was left.
    assert "Failed to connect to GCS" not in proc.stderr and "could not join" not in proc.stderr
    assert _ray_processes(ray_tmpdir) == []
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    name = os.path.basename(job)
    assert lines[0].startswith(f"{name}: ") and f"RAY_ADDRESS={address}: no Ray cluster answers there" in lines[0]
    assert "unset RAY_ADDRESS" in lines[0]
    assert not (tmp_path / "tokens").exists() and not (tmp_path / "run").exists()


def test_local_cluster_workers_run_the_quiet_hook(ray_tmpdir):
    """The worker_process_setup_hook really runs in the local cluster's workers (where Ray Train's
    PlacementGroupCleaner would otherwise log a failed State API query every second), they see Ray
    Train's preemption watcher turned off, and ray.shutdown at exit leaves no process behind."""
    _stale_record(ray_tmpdir)
    script = textwrap.dedent(
        """
        import logging, ray
        from moeforge.platform.launch.ray_connection import connect_ray

        connect_ray(num_cpus=1, logging_level=logging.WARNING)

        @ray.remote(num_cpus=0)
        def filters():
            name = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
            return [type(f).__name__ for f in logging.getLogger(name).filters]

        @ray.remote(num_cpus=0)
        def watcher():
            import os
            return os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")

        print("filters", ray.get(filters.remote()))
        print("preemption watcher", ray.get(watcher.remote()))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env=_env(ray_tmpdir), cwd=ray_tmpdir,
                          capture_output=True, text=True, timeout=180, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "filters ['_DropMessage']" in proc.stdout, proc.stdout
    assert "preemption watcher 0" in proc.stdout, proc.stdout
    _assert_no_cluster_left(ray_tmpdir)
