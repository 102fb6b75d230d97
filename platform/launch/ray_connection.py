"""The one way moeforge connects to Ray: `connect_ray()`, used by every job that needs a cluster
(training launch, data preparation, the data benchmark).

Which cluster:
  - a process already connected (a test's session cluster, or a caller's own `ray.init`) keeps its
    session, whatever the arguments;
  - with RAY_ADDRESS set (`ray job submit` sets it to the cluster's GCS address for its entrypoint)
    it joins that cluster, after checking that something listens there: `ray.init` itself retries
    an unreachable GCS for minutes, printing a time-out every few seconds, so a dead address fails
    here in seconds with one line naming it and the fix (`RayConnectionError`);
  - otherwise it starts a fresh local cluster (`address="local"`). A bare `ray.init()` would instead
    join the cluster recorded in `$RAY_TMPDIR/ray/ray_current_cluster` and, when that record was
    left by a crashed `ray start --head`, retry it forever.

A local cluster started here belongs to this process: Ray shuts it down when the process exits
(`ray.init` registers `ray.shutdown` with atexit), and callers that finish earlier may call
`ray.shutdown()` themselves. It runs without the dashboard and without Ray Train's preemption
watcher (no node of a local cluster is ever drained). The worker processes of any cluster it starts
or joins first run `quiet_workers`, which drops the one recurring Ray log line that a cluster
without the dashboard provokes, with `moeforge.platform.outputs.log_filters.drop_log_message`
(unless a submitted job's runtime environment brings a setup hook of its own: Ray refuses two).
A joined cluster keeps the preemption watcher, whose creation Ray's core worker reports once per
run with an error-level line about restartable actors; that line is C++ logging, out of reach of
a Python filter, and the watcher is what turns a reclaimed spot node into a retry.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from types import ModuleType

from moeforge.platform.config.builder import ConfigError
from moeforge.platform.outputs.log_filters import drop_log_message

RAY_ADDRESS = "RAY_ADDRESS"
# Ray Train's controller starts a PreemptionWatcher per worker group, which polls for nodes being
# drained (spot instances reclaimed, autoscaler scale-down) and charges the failures they cause to
# a separate retry budget. A local cluster is this one machine, ending with this process: no node of
# it is ever drained. The watcher is created with the workers' actor handles as arguments and
# max_restarts=-1, which makes Ray's core worker log an error-level line about restartable actors
# in every run; on a local cluster it is not started at all. Clusters joined through RAY_ADDRESS keep it.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
QUIET_HOOK = f"{__name__}.quiet_workers"
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
AUTH_MODE_ENV = "RAY_AUTH_MODE"  # what `ray job submit` hands its entrypoint
PROBE_TIMEOUT_S = 5.0  # per TCP connect; a firewalled host fails within this, a closed port at once
RAY_CLIENT_PORT = 10001  # Ray Client's default port (`ray://host` without one)
_FIX = "start one with `ray start --head` or unset RAY_ADDRESS to run on a local cluster"


class RayConnectionError(ConfigError):
    """RAY_ADDRESS names no reachable Ray cluster. The message is one line naming the address and
    the fix; the jobs print it as a user error (exit 2), as they print every ConfigError."""


def connect_ray(
    *, num_cpus: int | None = None, log_to_driver: bool = True, logging_level: int = logging.INFO
) -> ModuleType:
    """Connect this process to Ray (see the module docstring for which cluster); return `ray`.

    `num_cpus` sizes a local cluster started here and is ignored when joining one; `log_to_driver`
    and `logging_level` are `ray.init`'s. A local cluster runs without the dashboard (it would add
    11 processes, about 1 GB of resident memory and 3-5 s of start-up, measured on the 2-core machine),
    and its workers run `quiet_workers` first. Raises RayConnectionError when RAY_ADDRESS
    names a cluster that does not answer."""
    import ray

    if ray.is_initialized():
        return ray
    if not sys.stdout.isatty():  # a log file or a pipe: Ray prefixes workers' lines without colour codes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    common = {"log_to_driver": log_to_driver, "logging_level": logging_level}
    address = os.environ.get(RAY_ADDRESS, "").strip()
    if not address or address == "local":
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            runtime_env={
                "worker_process_setup_hook": QUIET_HOOK,
                "env_vars": {PREEMPTION_WATCHER_ENV: "0"},
            },
            **common,
        )
        return ray
    target = reachable_address(address)
    if not _job_sets_a_setup_hook():
        common["runtime_env"] = {"worker_process_setup_hook": QUIET_HOOK}
    try:
        ray.init(address=target, **common)
    except Exception as err:  # noqa: BLE001 -- re-raised as one line; Ray raises many kinds here
        if ray.is_initialized():
            ray.shutdown()
        reason = " ".join(str(err).split()) or type(err).__name__
        hint = ""
        if os.environ.get(AUTH_MODE_ENV, "").strip().lower() != "token":
            # Ray reports a refused token only in its own log lines, not in the exception
            hint = f"; if the cluster uses token authentication (`ray start --head` turns it on), set {AUTH_MODE_ENV}=token"
        raise RayConnectionError(
            f"RAY_ADDRESS={address}: could not join the Ray cluster at {target}: {reason[:300]}{hint}"
        ) from None
    return ray


def _job_sets_a_setup_hook() -> bool:
    """Whether this process is a submitted job whose runtime environment has its own setup hook."""
    try:
        job = json.loads(os.environ.get(JOB_CONFIG_ENV) or "{}")
    except ValueError:
        return False
    runtime_env = job.get("runtime_env") if isinstance(job, dict) else None
    return isinstance(runtime_env, dict) and "worker_process_setup_hook" in runtime_env


def quiet_workers() -> None:
    """Ray's `worker_process_setup_hook` for the clusters `connect_ray` starts or joins: runs in
    each of this job's worker processes before any task or actor.

    Ray Train starts a detached PlacementGroupCleaner that asks Ray's State API, served by the
    dashboard, whether the training controller is still alive, every second; without the dashboard
    each query fails and it logs "Failed to query Ray Train Controller actor state" (about 850 lines
    in a 13-minute `make train`). Its job, removing the placement group of a controller that died
    while the cluster lives on, does not arise on a local cluster, which ends with this process, and
    cannot be done on a joined cluster without the dashboard."""
    drop_log_message(
        "ray.train.v2._internal.execution.controller.placement_group_cleaner",
        "Failed to query Ray Train Controller actor state",
    )


def check_ray_address() -> None:
    """Fail early, before expensive work, when RAY_ADDRESS names a cluster that does not answer
    (RayConnectionError); does nothing when connected already or when RAY_ADDRESS is unset/local."""
    import ray

    address = os.environ.get(RAY_ADDRESS, "").strip()
    if address and address != "local" and not ray.is_initialized():
        reachable_address(address)


def reachable_address(address: str) -> str:
    """The address to pass `ray.init` for RAY_ADDRESS=`address`, once something accepts a TCP
    connection there; raises RayConnectionError naming the address and the fix otherwise.

    Accepted forms: `host:port` (a GCS, as `ray job submit` sets it), `ray://host[:port]` (Ray
    Client, port 10001 by default) and `auto` (the cluster recorded by the last `ray start` in
    `$RAY_TMPDIR/ray/ray_current_cluster`). An `http(s)://` address is a job server (dashboard)
    URL, which `ray job submit` takes but a driver cannot join: refused with the right command."""
    if address.startswith(("http://", "https://")):
        raise RayConnectionError(
            f"RAY_ADDRESS={address} is a Ray job server (dashboard) URL, which a training or prepare "
            "process cannot join; submit to it with `ray job submit --address "
            f"{address} -- <command>`, set RAY_ADDRESS to the cluster's GCS address (host:port), "
            "or unset RAY_ADDRESS to run on a local cluster"
        )
    if address == "auto":
        record = _cluster_record()
        recorded = _read(record)
        if not recorded:
            raise RayConnectionError(
                f"RAY_ADDRESS=auto: no running Ray cluster is recorded in {record}; {_FIX}"
            )
        _probe(recorded, f"RAY_ADDRESS=auto ({record} names {recorded})")
        return recorded
    _probe(address, f"RAY_ADDRESS={address}")
    return address


def _probe(address: str, label: str) -> None:
    client = address.startswith("ray://")
    host, port = _host_port(address[len("ray://") :] if client else address, label, client)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__  # e.g. "Connection refused", "timed out"
        if isinstance(err, TimeoutError):
            reason = f"no answer in {PROBE_TIMEOUT_S:.0f}s"
        raise RayConnectionError(f"{label}: no Ray cluster answers there ({reason}); {_FIX}") from None


def _host_port(hostport: str, label: str, client: bool) -> tuple[str, int]:
    """(host, port) of `host:port`, `[v6]:port`, or, for Ray Client, a bare host."""
    hostport = hostport.rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or "]" in port:  # no port at all (`host`, `[::1]`)
        host, port = hostport, ""
    host = host.strip("[]")
    if not port and client:
        return host, RAY_CLIENT_PORT
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RayConnectionError(
            f"{label}: not a Ray address; use host:port (a cluster's GCS address, as `ray start --head` "
            "prints), ray://host:port (Ray Client) or auto, or unset RAY_ADDRESS to run on a local cluster"
        )
    return host, int(port)


def _cluster_record() -> str:
    """The file in which `ray start` records the cluster it started (`ray.init("auto")` reads it)."""
    try:
        from ray._common.utils import get_ray_address_file

        return get_ray_address_file(None)
    except ImportError:  # another Ray layout: its documented default place
        return os.path.join(os.environ.get("RAY_TMPDIR", "/tmp"), "ray", "ray_current_cluster")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""
