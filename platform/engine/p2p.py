"""Asynchronous point-to-point transfers between pipeline ranks, with timeouts and timing records.

Every transfer is non-blocking (`torch.distributed.isend` / `irecv`); the executor posts receives
ahead of need and only waits when a compute action needs the data, so transfers overlap computation.
The time spent blocked in `wait` is the *exposed* communication time: the part that computation did
not hide. The same endpoint times the MoE all-to-alls that phase programs launch asynchronously
(`track_collective`): their blocked time is kept apart (`exposed_a2a_s`), and each becomes an A2A
timeline span from launch to the end of its wait (gloo has no completion timestamp: when the wait
did not block, the span ends where the result was consumed), with an A2A_WAIT record where it
blocked.

Transfers go over the rank's links (`Topology.p2p_links`): one process group per direction
between two pipeline neighbours. NCCL runs the ungrouped point-to-point ops of one (group, pair)
in posting order on one stream, and a posted receive blocks that stream until its data arrives; on
a link, one side only sends and the other only receives, and the executor posts both in
action-list order, so the k-th send meets the k-th receive. Tags still tell transfers apart for
gloo, which matches by (source, tag).

NCCL creates a pair's communicator at the pair's first transfer, a handshake that blocks both
hosts: two ranks whose first transfers are on different links would each wait in a different
handshake. `open_links` therefore makes one small transfer per link, in one global order, before
the first step.

Waits. On gloo a wait polls from the host and never hangs: after `timeout_s` it raises
`PeerTimeout` naming this rank, the peer and the transfer. On NCCL a wait only makes the current
stream wait for the transfer, so the host keeps running ahead; a dead peer is left to the process
group's timeout and NCCL's watchdog, which end the run.

Times come from the step's clock (`step_clock.clock_for`): host readings on CPU, CUDA events on a GPU.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from moeforge.platform.engine.step_clock import HostClock, StepClock
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
    posted: object  # a mark of the step's clock
    done: object | None = None


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
    `links` maps (sender, receiver) world ranks to the process group of that direction (see the
    module docstring); `name` (e.g. "rank 3 (pp 1, dp 1)") appears in errors; this rank's timeline
    records (the executor's compute records too) carry `timeline_rank`. `host_waits`: waits poll
    from the host with `timeout_s` (gloo); False on NCCL."""

    rank: int
    timeout_s: float
    links: dict[tuple[int, int], object]
    name: str = ""
    timeline_rank: int = 0
    device: torch.device | str = "cpu"
    clock: StepClock = field(default_factory=HostClock)
    host_waits: bool = True
    records: list[TimelineRecord] = field(default_factory=list)
    pending_sends: list[Transfer] = field(default_factory=list)

    def start_step(self) -> None:
        self.clock.start()
        self.records = []

    def _now(self) -> object:
        return self.clock.now()

    def _link(self, sender: int, receiver: int):
        try:
            return self.links[(sender, receiver)]
        except KeyError:
            raise RuntimeError(
                f"{self.name or f'rank {self.rank}'}: no link from rank {sender} to rank {receiver} "
                "(transfers go between pipeline neighbours only)"
            ) from None

    def isend(self, tensor: torch.Tensor, dst: int, tag: int, label: str) -> Transfer:
        tensor = tensor.detach().contiguous()
        work = dist.isend(tensor, dst=dst, group=self._link(self.rank, dst), tag=tag)
        t = Transfer(work, tensor, dst, label, "send", self._now())
        self.pending_sends.append(t)
        return t

    def irecv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, tag: int, label: str) -> Transfer:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        work = dist.irecv(buf, src=src, group=self._link(src, self.rank), tag=tag)
        return Transfer(work, buf, src, label, "recv", self._now())

    def track_collective(self, work: object, out: torch.Tensor, label: str) -> TrackedCollective:
        """Wrap an asynchronous collective launched just now (moe.dispatch.launch_all_to_all)."""
        return TrackedCollective(self, Transfer(work, out, -1, label, "a2a", self._now()))

    def wait(self, t: Transfer) -> torch.Tensor:
        """Wait for `t` (the time blocked is exposed communication: a WAIT or A2A_WAIT record);
        return its tensor. On NCCL the current stream waits, not the host."""
        if t.done is None:
            start = self._now()
            if self.host_waits:
                self._wait_on_host(t)
            else:
                t.work.wait()
            end = self._now()
            t.done = end
            wait_kind = "A2A_WAIT" if t.kind == "a2a" else "WAIT"
            self.records.append(TimelineRecord(self.timeline_rank, "wait " + t.label, wait_kind, start, end))
            self.records.append(TimelineRecord(self.timeline_rank, t.label, t.kind.upper(), t.posted, end))
        return t.tensor

    def _wait_on_host(self, t: Transfer) -> None:
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


def open_links(p2p: P2P, links: list[tuple[int, int]]) -> None:
    """One small transfer per link of `links` (every directed pair, `Topology.p2p_links` order) that
    this rank is part of, waited for before the next: NCCL creates each pair's communicator here, in
    the same order on every rank, instead of at a first transfer whose order differs between ranks
    (see the module docstring). Every rank calls it with the same list."""
    for sender, receiver in links:
        label = f"link {sender}->{receiver}"
        if p2p.rank == sender:
            token = torch.zeros(1, device=p2p.device)
            work = dist.isend(token, dst=receiver, group=p2p._link(sender, receiver))
            t = Transfer(work, token, receiver, label, "send", None)
        elif p2p.rank == receiver:
            token = torch.empty(1, device=p2p.device)
            work = dist.irecv(token, src=sender, group=p2p._link(sender, receiver))
            t = Transfer(work, token, sender, label, "recv", None)
        else:
            continue
        if p2p.host_waits:
            p2p._wait_on_host(t)
        else:
            work.wait()
