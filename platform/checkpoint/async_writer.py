"""Asynchronous checkpoints: snapshot at the step, write and upload in the background.

A synchronous checkpoint stops training for the whole save: serialize every tensor, hash it, write
it (and upload it to S3), then commit. Only one part of that has to happen on the critical path:
taking a consistent copy of the state, because the next optimizer step overwrites the weights and
moments in place. `AsyncCheckpointWriter.submit` does exactly that part in the calling thread (every
tensor copied to host memory, pinned when it comes from a GPU) and returns; a daemon thread then
runs the ordinary `save_shard` (safetensors + manifest) and, on the rank that commits,
`commit_checkpoint` (meta.json, then COMPLETE). The format on storage is the synchronous one: a
reader cannot tell the two apart.

Why at most ONE checkpoint in flight: each in-flight checkpoint holds a full host copy of the
state, so two would double that memory; a write slower than the checkpoint interval would otherwise
queue up without bound; and checkpoints complete in step order, so "the newest complete checkpoint"
only moves forward. `submit` therefore first waits for the previous checkpoint (that wait is part of
the time it reports as blocked) and reports that one's failure per the policy. The host buffers of a
finished snapshot are reused by the next one when shapes and dtypes match (no re-allocation or
re-pinning per checkpoint), which is safe only because the previous write has ended.

Why storage polling instead of a barrier: the background thread must not call torch.distributed.
Collectives on a process group must be issued in the same order on every rank, and the training
thread is issuing its own (all-to-all, p2p, ZeRO reductions) concurrently, so a barrier from a
second thread could interleave with them differently per rank and deadlock or corrupt them. The
ranks already meet on storage: `save_shard` writes a shard's manifest last, after its tensor file,
so rank 0's thread waits until every expected shard's manifest exists (polling every `poll_s`, at
most `commit_timeout_s`), then commits; `commit_checkpoint` re-checks every manifest and file size.
A shard that never appears is a failure naming it, and no COMPLETE is written.
(One window the barrier did not have: a manifest left in the step's folder by an interrupted
earlier attempt at the same step counts as present until that rank's new save_shard deletes it; a
run restarted from its newest complete checkpoint replays those steps, and commit_checkpoint's size
check rejects a manifest that does not match its file.)

Nothing is lost on failure: COMPLETE is written only by `commit_checkpoint` after every shard was
confirmed, so an error at any point (snapshot, write, upload, wait, commit) leaves the previous
complete checkpoint the latest, and pruning runs only after a commit succeeded.

Failure policy (`failure`, checkpoint.async_failure): "fail" raises `CheckpointError` (naming the
step, the original exception chained) from the next `poll`, `wait`, `submit` or `close`, so the run
stops at its next step; "continue" logs the failure once, counts it (`failures`, `last_error`) and
training goes on.

    writer = AsyncCheckpointWriter(run_dir, storage=storage, failure="fail")
    ...
    writer.submit(step, {"model": model, "optimizer": opt_state, "rng": RNGState()}, shard=(pp, dp),
                  commit={"world": {"pp": P, "dp": D}, "samples_consumed": n} if rank == 0 else None)
    for step_done, path in writer.poll(): ...   # each step: completed checkpoints, failures raised
    writer.close()                              # at the end: wait for the last one
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Self

import torch
from moeforge.platform.checkpoint.pieces import ShardedTensor
from moeforge.platform.checkpoint.state import CheckpointError
from moeforge.platform.checkpoint.store import (
    Shard,
    checkpoint_path,
    commit_checkpoint,
    save_shard,
    shard_name,
)
from moeforge.platform.outputs.storage import Storage, open_storage

FAILURE_POLICIES = ("fail", "continue")
# The keyword arguments of commit_checkpoint that a `commit` dict may hold (storage is the writer's).
COMMIT_KEYS = frozenset({"world", "samples_consumed", "lr_step", "config", "extra", "shards", "keep"})

__all__ = ["AsyncCheckpointWriter", "CheckpointRecord", "snapshot_state"]


@dataclass
class CheckpointRecord:
    """One submitted checkpoint, as the benchmark and the run's log see it.

    `snapshot_s`: seconds `submit` blocked the caller (waiting for the previous checkpoint, then
    copying the state): the checkpoint's cost on the critical path; `wait_s` is the waiting part.
    `write_s`: seconds the background thread took (save_shard, the wait for other shards, the
    commit). `bytes`: the snapshot's tensor bytes. `status`: "in flight", "done" or "failed"."""

    step: int
    shard: Shard
    commits: bool
    snapshot_s: float = 0.0
    wait_s: float = 0.0
    write_s: float | None = None
    bytes: int = 0
    status: str = "in flight"
    path: str | None = None
    error: str | None = None


# --- the snapshot (caller's thread) ----------------------------------------------------------------


def _host_copy(tensor: torch.Tensor, reuse: torch.Tensor | None, pin: bool) -> torch.Tensor:
    """A host-memory copy of `tensor` that shares nothing with it (into `reuse` when it fits)."""
    tensor = tensor.detach()
    if (
        reuse is not None
        and reuse.shape == tensor.shape
        and reuse.dtype == tensor.dtype
        and reuse.is_contiguous()
        and (not pin or reuse.is_pinned())
    ):
        return reuse.copy_(tensor, non_blocking=pin)
    if pin:  # page-locked memory: the device-to-host copy runs at full bandwidth, asynchronously
        out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return out.copy_(tensor, non_blocking=True)
    return tensor.to("cpu", copy=True).contiguous()


def snapshot_state(
    state: Mapping[str, Any], buffers: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, dict[str, torch.Tensor | ShardedTensor]], int]:
    """{part: Stateful | {name: Tensor | ShardedTensor}} -> ({part: {name: host copy}}, tensor bytes).

    Every tensor is copied (a ShardedTensor becomes one with a copied `local` and the same global
    shape and offset), so the live state may change the moment this returns. GPU tensors go to
    pinned host memory and the copies are waited for before returning. `buffers`, keyed
    "part/name", are reused when shape and dtype match and are updated with the new copies (the
    caller guarantees no write still reads them)."""
    snapshot: dict[str, dict[str, torch.Tensor | ShardedTensor]] = {}
    nbytes = 0
    used_cuda = False
    new_buffers: dict[str, torch.Tensor] = {}
    for part, value in state.items():
        tensors = value.state_dict() if hasattr(value, "state_dict") else value
        if not isinstance(tensors, Mapping):
            raise TypeError(
                f"state[{part!r}]: expected a Stateful or a dict of tensors, got {type(value).__name__}"
            )
        out: dict[str, torch.Tensor | ShardedTensor] = {}
        for name, item in tensors.items():
            key = f"{part}/{name}"
            local = item.local if isinstance(item, ShardedTensor) else item
            if not isinstance(local, torch.Tensor):
                raise TypeError(f"state {key}: {type(item).__name__} is not a tensor")
            pin = local.is_cuda
            used_cuda |= pin
            copied = _host_copy(local, None if buffers is None else buffers.get(key), pin)
            new_buffers[key] = copied
            nbytes += copied.numel() * copied.element_size()
            out[name] = (
                ShardedTensor(copied, item.global_shape, item.offset)
                if isinstance(item, ShardedTensor)
                else copied
            )
        snapshot[part] = out
    if used_cuda:
        torch.cuda.synchronize()  # the non-blocking copies must have landed before training resumes
    if buffers is not None:
        buffers.clear()
        buffers.update(new_buffers)
    return snapshot, nbytes


# --- the writer ------------------------------------------------------------------------------------


class _Job:
    def __init__(self, record: CheckpointRecord) -> None:
        self.record = record
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None


class AsyncCheckpointWriter:
    """Checkpoints of one rank, written on a background thread (see the module docstring).

    `run_dir`: the run's directory (local or s3://); `storage`: the run's open storage, rooted at
    run_dir or above it (None opens one now, in the caller's thread, so a bad S3 setup fails at
    once). `failure`: "fail" | "continue". `log`: receives the line of a tolerated failure.
    `commit_timeout_s` / `poll_s`: how long, and how often, the committing rank looks for the
    other shards' manifests.

    `history` holds a `CheckpointRecord` per submitted checkpoint (timings for the benchmark);
    `failures` counts background failures, `last_error` is the newest one."""

    def __init__(
        self,
        run_dir: str,
        *,
        storage: Storage | None = None,
        failure: str = "fail",
        log: Callable[[str], None] = print,
        commit_timeout_s: float = 600.0,
        poll_s: float = 0.2,
    ) -> None:
        if failure not in FAILURE_POLICIES:
            raise ValueError(f"failure: must be one of {', '.join(FAILURE_POLICIES)}, got {failure!r}")
        if commit_timeout_s <= 0:
            raise ValueError(f"commit_timeout_s: must be > 0, got {commit_timeout_s}")
        if poll_s <= 0:
            raise ValueError(f"poll_s: must be > 0, got {poll_s}")
        self.run_dir = str(run_dir).rstrip("/")
        # Opened once (S3: checked now, in the caller's thread) and shared with the thread.
        self.storage = storage if storage is not None else open_storage(self.run_dir)
        self._relative(self.run_dir)  # a storage rooted elsewhere fails here
        self.failure = failure
        self.log = log
        self.commit_timeout_s = float(commit_timeout_s)
        self.poll_s = float(poll_s)
        self.history: list[CheckpointRecord] = []
        self.failures = 0
        self.last_error: BaseException | None = None
        self._job: _Job | None = None  # the one checkpoint in flight (or finished, not yet reported)
        self._completed: list[tuple[int, str]] = []
        self._buffers: dict[str, torch.Tensor] = {}
        self._closed = False

    # --- the caller's side --------------------------------------------------------------------
    def submit(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        shard: Shard = (0, 0),
        commit: Mapping[str, Any] | None = None,
    ) -> CheckpointRecord:
        """Checkpoint `state` as it is now, for `step`: wait for the checkpoint in flight (raising
        its failure under "fail"), copy the state to host memory, start the background write, and
        return its record. `commit` (the committing rank only): commit_checkpoint's keyword
        arguments (world, samples_consumed, lr_step, config, extra, shards, keep)."""
        if self._closed:
            raise RuntimeError("AsyncCheckpointWriter.submit after close()")
        shard_name(shard)  # a bad shard fails here, not in the thread
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        commit = self._check_commit(commit)
        started = time.perf_counter()
        self._join()
        waited = time.perf_counter() - started
        self._collect()  # the previous one's outcome: completed, or raised / logged per the policy
        record = CheckpointRecord(
            step=int(step), shard=(int(shard[0]), int(shard[1])), commits=commit is not None
        )
        snapshot, record.bytes = snapshot_state(state, self._buffers)
        record.wait_s = waited
        record.snapshot_s = time.perf_counter() - started
        self.history.append(record)
        job = _Job(record)
        job.thread = threading.Thread(
            target=self._write,
            args=(job, snapshot, commit),
            name=f"moeforge-checkpoint-{step}",
            daemon=True,
        )
        self._job = job
        job.thread.start()
        return record

    def poll(self) -> list[tuple[int, str]]:
        """Checkpoints (step, path) completed since the last poll, without blocking. For the
        committing rank a checkpoint is complete once committed; for the others, once their shard
        is written. A background failure raises CheckpointError under "fail" (once), and is
        logged and counted under "continue"."""
        if self._job is not None and self._job.thread is not None and not self._job.thread.is_alive():
            self._collect()
        done, self._completed = self._completed, []
        return done

    def wait(self) -> list[tuple[int, str]]:
        """Join the checkpoint in flight, then as `poll`."""
        self._join()
        return self.poll()

    @property
    def in_flight(self) -> bool:
        job = self._job
        return job is not None and job.thread is not None and job.thread.is_alive()

    def close(self) -> list[tuple[int, str]]:
        """Wait for the last checkpoint and stop accepting new ones; returns as `wait`."""
        try:
            return self.wait()
        finally:
            self._closed = True
            self._buffers.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # an error is already on its way out: finish the write, but do not replace that error
            self.close()
        except CheckpointError as err:
            self.log(f"async checkpoint failed while the run was ending: {err}")

    # --- internals ----------------------------------------------------------------------------
    @staticmethod
    def _check_commit(commit: Mapping[str, Any] | None) -> dict[str, Any] | None:
        if commit is None:
            return None
        unknown = sorted(set(commit) - COMMIT_KEYS)
        if unknown:
            raise ValueError(f"commit: unknown key {unknown[0]!r} (known: {', '.join(sorted(COMMIT_KEYS))})")
        for key in ("world", "samples_consumed"):
            if key not in commit:
                raise ValueError(f"commit: missing {key!r}")
        # A private copy: the caller may change its config or extra dicts while the thread runs.
        return copy.deepcopy(dict(commit))

    def _join(self) -> None:
        job = self._job
        if job is not None and job.thread is not None:
            job.thread.join()

    def _collect(self) -> None:
        """Report the finished job's outcome (it must have ended)."""
        job, self._job = self._job, None
        if job is None:
            return
        if job.error is None:
            self._completed.append((job.record.step, job.record.path))
            return
        err, record = job.error, job.record
        if self.failure == "fail":
            raise CheckpointError(f"async checkpoint of step {record.step} failed: {record.error}") from err
        self.failures += 1
        self.last_error = err
        self.log(
            f"async checkpoint of step {record.step} failed ({record.error}); training continues, "
            f"the previous complete checkpoint stays the latest [{self.failures} failure(s) so far]"
        )

    def _write(self, job: _Job, snapshot: dict, commit: dict[str, Any] | None) -> None:
        """The background thread: this rank's shard, then (committing rank) the commit. Storage
        only: no torch.distributed here (see the module docstring)."""
        record = job.record
        started = time.perf_counter()
        try:
            path = save_shard(self.run_dir, record.step, snapshot, shard=record.shard, storage=self.storage)
            if commit is not None:
                self._wait_for_shards(record.step, commit)
                path = commit_checkpoint(self.run_dir, record.step, storage=self.storage, **commit)
            record.path = path
            record.status = "done"
        except BaseException as err:  # noqa: BLE001 - reported to the training thread by _collect
            job.error = err
            record.status = "failed"
            record.error = f"{type(err).__name__}: {err}"
        finally:
            record.write_s = time.perf_counter() - started

    def _expected_shards(self, commit: Mapping[str, Any]) -> list[Shard]:
        if commit.get("shards") is not None:
            return [(int(p), int(d)) for p, d in commit["shards"]]
        world = commit["world"]
        pp, dp = int(world.get("pp", 0)), int(world.get("dp", 0))
        if pp < 1 or dp < 1:
            raise ValueError(f"world {dict(world)}: needs 'pp' >= 1 and 'dp' >= 1 (or pass shards=[...])")
        return [(p, d) for p in range(pp) for d in range(dp)]

    def _relative(self, path: str) -> str:
        """`path` relative to the storage's root (which must be `path` or a folder above it)."""
        root = self.storage.root
        if path == root:
            return ""
        if path.startswith(root + "/"):
            return path[len(root) + 1 :]
        raise ValueError(f"{path}: not under the given storage root {root}")

    def _wait_for_shards(self, step: int, commit: Mapping[str, Any]) -> None:
        """Until every expected shard's manifest exists (each rank writes its manifest last)."""
        folder = self._relative(checkpoint_path(self.run_dir, step))
        missing = [shard_name(s) for s in self._expected_shards(commit)]
        deadline = time.monotonic() + self.commit_timeout_s
        while True:
            missing = [name for name in missing if not self.storage.exists(f"{folder}/{name}.json")]
            if not missing:
                return
            if time.monotonic() >= deadline:
                raise CheckpointError(
                    f"{self.storage.url(folder)}: shard(s) {', '.join(missing)} not written within "
                    f"{self.commit_timeout_s:g} s (checkpoint.async waits for every rank's manifest "
                    "before committing); not committed"
                )
            time.sleep(self.poll_s)
