"""Run a function on N local processes joined in a gloo process group (no Ray).

Used by the pipeline benchmark and by tests that exercise the executor without paying Ray Train's
start-up; `moeforge-train` itself always goes through Ray (`platform.launch.ray_train.launch_training`).

The processes come from a forkserver that has imported torch, DeepSpeed and the training code once,
and done DeepSpeed's first-use communication work (`deepspeed_comm_preload`):
a fresh interpreter per rank re-imports all of it (seconds of CPU per rank, paid by every call),
while a fork of the server starts in milliseconds. The server only imports, never computes, so
no thread pool exists to be broken by the fork. Each rank takes the caller's environment and
working directory as they are at the call, as a spawned process would, not the server's.

The ranks are gloo ranks, so they train on the CPU and DeepSpeed's accelerator is "cpu". DeepSpeed
fixes its accelerator when it is imported, which the server does once for every rank: the server is
started with DS_ACCELERATOR=cpu, whatever the caller's environment says, and each rank then checks
its accelerator as a Ray worker does (`accelerator.use_accelerator_for`): a caller's DS_ACCELERATOR
other than "cpu" is refused there.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp
from moeforge.platform.launch.accelerator import ACCELERATOR_ENV, use_accelerator_for

# After one rank fails, the others have this long to end on their own (rank 0 records the failure;
# ranks stopped together by SIGTERM write their checkpoint) before they are killed.
FAILURE_GRACE_S = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What the forkserver imports before it forks the first rank (the heavy part of every rank's start).
# Two modules are imported lazily on a rank's first use, and cost it seconds each: torch._dynamo
# (initialising parameters under a device context goes through it) and DeepSpeed's Muon optimizer,
# whose module calls torch.compile at import (DeepSpeed imports it to check any ZeRO optimizer).
# Importing them starts no thread. A preload that a version lacks is skipped by the forkserver.
_PRELOAD = [
    "torch",
    "torch.distributed",
    "torch._dynamo",
    "deepspeed",
    "deepspeed.runtime.zero.muon.muon_optimizer",
    "moeforge.platform.launch.deepspeed_comm_preload",
    "moeforge.platform.launch.local_spawn",
    "moeforge.platform.train.pipeline",
    "moeforge.platform.train.single",
]


def _entry(rank, world_size, port, timeout_s, fn, args, queue, env, cwd) -> None:
    import torch
    import torch.distributed as dist

    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    os.environ.setdefault("LOCAL_RANK", "0")
    try:
        use_accelerator_for(torch.device("cpu"))
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s)
        )
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException as err:  # report every failure to the parent, then exit non-zero
        queue.put((rank, "error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _start_server() -> None:
    """Start this process's forkserver, if it is not running, with DS_ACCELERATOR=cpu: it imports
    deepspeed, which fixes the accelerator of every rank forked from it. The caller's environment is
    restored at once (the ranks take it from the call, not from the server)."""
    from multiprocessing import forkserver

    saved = os.environ.get(ACCELERATOR_ENV)
    os.environ[ACCELERATOR_ENV] = "cpu"
    try:
        forkserver.ensure_running()
    finally:
        if saved is None:
            del os.environ[ACCELERATOR_ENV]
        else:
            os.environ[ACCELERATOR_ENV] = saved


def spawn_gloo(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    timeout_s: float = 300.0,
    failure_grace_s: float = FAILURE_GRACE_S,
) -> dict[int, Any]:
    """Call `fn(rank, world_size, *args)` on `world_size` spawned processes sharing a gloo group;
    return {rank: result}. A failure on any rank raises RuntimeError with that rank's traceback,
    once the other ranks have ended or `failure_grace_s` has passed (a caller whose other ranks
    have nothing to finish, a hung peer's, need not wait for them)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # takes effect when the server starts (the first call)
    _start_server()
    queue = ctx.SimpleQueue()
    port = _free_port()
    env, cwd = dict(os.environ), os.getcwd()
    procs = [
        ctx.Process(
            target=_entry, args=(r, world_size, port, timeout_s, fn, args, queue, env, cwd), daemon=True
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    for _ in range(world_size):
        rank, status, payload = queue.get()
        if status == "ok":
            results[rank] = payload
        else:
            errors.append(f"rank {rank}: {payload}")
            break  # the first failure decides; the others get a grace period, then are killed
    deadline = time.monotonic() + (failure_grace_s if errors else 30.0)
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():  # SIGKILL: a rank in training treats SIGTERM as "stop after this step"
            p.kill()
            p.join(timeout=30)
    if errors:
        raise RuntimeError("\n".join(errors))
    return results
