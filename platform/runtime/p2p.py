"""Asynchronous point-to-point transfers between pipeline ranks, with timeouts and timing records.

Every transfer is non-blocking (`torch.distributed.isend` / `irecv`); the executor posts receives
ahead of need and only waits when a compute action needs the data, so transfers overlap computation.
The time spent blocked in `wait` is the *exposed* communication time: the part that computation did
not hide. The same endpoint times the MoE all-to-alls that phase programs launch asynchronously
(`track_collective`): their blocked time is kept apart (`exposed_a2a_s`), and each becomes an A2A
timeline span from launch to the end of its wait (gloo has no completion timestamp: when the wait
did not block, the span ends where the result was consumed), with an A2A_WAIT record where it
blocked.

Tags tell apart transfers between the same two ranks (gloo matches a receive to a send by source and
tag, so the order in which the two sides post them does not matter). NCCL ignores tags and matches
in posting order; the executor posts sends and receives in schedule-list order, and the schedule
generator orders the two sides consistently.

A wait never hangs: after `timeout_s` it raises `PeerTimeout` naming this rank, the peer and the
transfer, so a peer that died or hangs ends the run with a clear message.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from moeforge.platform.outputs.timeline import TimelineRecord


class PeerTimeout(RuntimeError):
    """A transfer did not complete within parallel.p2p_timeout_s."""


@dataclass
class Transfer:
    """One posted send or receive; `tensor` is kept alive until the transfer completes."""

    work: object
    tensor: torch.Tensor
    peer: int
    label: str
    kind: str  # "send" | "recv" | "a2a"
    posted: float
    done: float | None = None


@dataclass
class TrackedCollective:
    """A launched collective whose `wait()` goes through its P2P endpoint's timing."""

    p2p: P2P
    transfer: Transfer

    def wait(self) -> torch.Tensor:
        return self.p2p.wait(self.transfer)


@dataclass
class P2P:
    """Point-to-point endpoint of one rank. `rank` is the world rank used for the transfers;
    `name` (e.g. "rank 3 (pp 1, dp 1)") appears in errors; this rank's timeline records (the
    executor's compute records too) carry `timeline_rank` (the world rank in a training run)."""

    rank: int
    timeout_s: float
    name: str = ""
    timeline_rank: int = 0
    device: torch.device | str = "cpu"
    clock: object = time.perf_counter
    t0: float = 0.0
    exposed_s: float = 0.0  # blocked on point-to-point transfers
    exposed_a2a_s: float = 0.0  # blocked on tracked collectives (the MoE all-to-alls)
    records: list[TimelineRecord] = field(default_factory=list)
    pending_sends: list[Transfer] = field(default_factory=list)

    def start_step(self, t0: float) -> None:
        self.t0 = t0
        self.exposed_s = 0.0
        self.exposed_a2a_s = 0.0
        self.records = []

    def _now(self) -> float:
        return self.clock() - self.t0

    def isend(self, tensor: torch.Tensor, dst: int, tag: int, label: str) -> Transfer:
        tensor = tensor.detach().contiguous()
        work = dist.isend(tensor, dst=dst, tag=tag)
        t = Transfer(work, tensor, dst, label, "send", self._now())
        self.pending_sends.append(t)
        return t

    def irecv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, tag: int, label: str) -> Transfer:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        work = dist.irecv(buf, src=src, tag=tag)
        return Transfer(work, buf, src, label, "recv", self._now())

    def track_collective(self, work: object, out: torch.Tensor, label: str) -> TrackedCollective:
        """Wrap an asynchronous collective launched just now (moe.all_to_all.launch_all_to_all)."""
        return TrackedCollective(self, Transfer(work, out, -1, label, "a2a", self._now()))

    def wait(self, t: Transfer) -> torch.Tensor:
        """Block until `t` completes (time counted as exposed communication); return its tensor."""
        if t.done is None:
            start = self._now()
            try:
                t.work.wait(datetime.timedelta(seconds=self.timeout_s))
            except RuntimeError as err:
                if t.kind == "a2a":
                    what = f"the all-to-all {t.label} over its EP group"
                else:
                    direction = "from" if t.kind == "recv" else "to"
                    what = f"{'receiving' if t.kind == 'recv' else 'sending'} {t.label} {direction} rank {t.peer}"
                raise PeerTimeout(
                    f"{self.name or f'rank {self.rank}'}: {what} did not complete within "
                    f"parallel.p2p_timeout_s={self.timeout_s:g}s ({err})"
                ) from None
            end = self._now()
            t.done = end
            wait_kind = "A2A_WAIT" if t.kind == "a2a" else "WAIT"
            if t.kind == "a2a":
                self.exposed_a2a_s += end - start
            else:
                self.exposed_s += end - start
            if end - start > 0:
                self.records.append(
                    TimelineRecord(self.timeline_rank, "wait " + t.label, wait_kind, start, end)
                )
            self.records.append(TimelineRecord(self.timeline_rank, t.label, t.kind.upper(), t.posted, end))
        return t.tensor

    def reap_sends(self) -> None:
        """Forget sends that already completed (frees their buffers without blocking)."""
        keep = []
        for t in self.pending_sends:
            if t.work.is_completed():
                t.done = self._now()
                self.records.append(TimelineRecord(self.timeline_rank, t.label, "SEND", t.posted, t.done))
            else:
                keep.append(t)
        self.pending_sends = keep

    def wait_sends(self) -> None:
        """Wait for every outstanding send (end of a step)."""
        self.reap_sends()
        for t in self.pending_sends:
            self.wait(t)
        self.pending_sends = []
