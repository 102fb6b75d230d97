"""Shared fixtures: one local Ray cluster and one S3 (moto) server for the whole session, and the
grouping that lets `make test` run the suite in several pytest-xdist workers.

Real components only: Ray, DeepSpeed on CPU, gloo, moto's S3 server on 127.0.0.1, W&B offline.
"""

from __future__ import annotations

import os
import socket

import pytest

# Set before anything imports deepspeed / wandb / torch threads.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Modules whose tests start Ray clusters of their own: a head on Ray's fixed port 6379 (the fake
# autoscaler's nodes join no other), `ray job submit` against it, several raylets, a cluster record
# in a RAY_TMPDIR. They and every test that uses the session's `ray_cluster` run in one xdist
# worker, one after another, as they would without xdist.
OWN_RAY_MODULES = {"test_autoscaling", "test_job_submit", "test_placement", "test_ray_connection", "test_namespace"}
RAY_GROUP = "ray"


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Under `pytest -n N --dist loadgroup`: Ray tests share one group (one Ray cluster, one port
    6379); every other module is a group of its own, so its module-scoped fixtures (a trained run,
    a reference) are built once, in one worker. The Ray tests come first: theirs is the longest
    group, so it starts at once while the other workers share the rest."""
    in_ray_group = set()
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if "ray_cluster" in item.fixturenames or module in OWN_RAY_MODULES:
            in_ray_group.add(item.nodeid)
        item.add_marker(pytest.mark.xdist_group(RAY_GROUP if item.nodeid in in_ray_group else module))
    items.sort(key=lambda item: item.nodeid not in in_ray_group)  # stable: the order within each part stays


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """A fresh local Ray cluster shared by every test that needs one (start-up costs seconds)."""
    import ray

    # address="local" never joins a stale cluster record left by another process.
    # Logical CPUs exceed the 2 physical cores so pp*dp=4 worker tests can be placed.
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 with throwaway credentials; yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ["AWS_ACCESS_KEY_ID"] = "testing-key-id"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "testing-secret"
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    yield f"http://127.0.0.1:{port}"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module's tests, the previous count restored after them.

    Modules whose figures were measured on one thread (as each pipeline worker runs) use it through
    `pytestmark = pytest.mark.usefixtures("one_thread")`. Module scope, so the module's own
    module-scoped fixtures compute on one thread too; a count set at import time instead would hold
    for every later module of the session."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
