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


# Modules whose tests start Ray clusters of their own, each on free ports with its own temp dir
# (the fake autoscaler's head alone binds Ray's fixed port 6379, which its nodes need): they may run
# beside the session's cluster.
OWN_RAY_MODULES = ("test_job_submit", "test_placement", "test_autoscaling", "test_ray_connection")
RAY_GROUP = "ray"


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Under `pytest -n N --dist loadgroup`: every test that runs Ray (the session's `ray_cluster`,
    or a cluster of its own) is in one group, run one after another by one worker while the other
    workers take the rest, so that two Ray clusters never start their workers at once
    (docs/testing.md). A module whose tests share a module- or class-scoped fixture of its own (a
    trained run, a reference) is a group, so the fixture is built once, in one worker. Every other
    test is a group of its own, so the last minutes are shared out test by test rather than module
    by module. The Ray group comes first, then the module groups, then the single tests; `make test`
    passes --no-loadscope-reorder, which keeps this order. Without xdist the marks change nothing."""

    def group(item) -> str:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if "ray_cluster" in item.fixturenames or module in OWN_RAY_MODULES:
            return RAY_GROUP
        return module if _shares_a_fixture_of_its_module(item) else item.nodeid

    def rank(item) -> int:
        name = group(item)
        return 0 if name == RAY_GROUP else 2 if name == item.nodeid else 1

    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))
    items.sort(key=rank)  # stable: the order within each part stays


def _shares_a_fixture_of_its_module(item) -> bool:
    """Whether the test uses a module-, class- or package-scoped fixture defined in its own module."""
    for defs in item._fixtureinfo.name2fixturedefs.values():
        fixture = defs[-1]
        if fixture.scope in ("module", "class", "package") and fixture.func.__module__ == item.module.__name__:
            return True
    return False


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
