"""Helpers shared by the generators: a per-rank list builder and the insertion of SEND/RECV pairs.

Generators write only the compute order of each rank (F, B, W, BW, F&B); `add_transfers` then places
every SEND/RECV pair so that the lists are deadlock-free even with blocking (rendezvous) point-to-point
semantics: it simulates the compute lists, orders all events on one global time line (a transfer sits at
the moment its data is produced, before any compute that starts at that moment) and gives each rank its
projection of that global order. Executing the global order event by event never blocks, so no
interleaving of blocking sends and receives can deadlock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace

from moeforge.platform.schedules.actions import Action, Kind, Schedule, ScheduleError
from moeforge.platform.schedules.dataflow import compute_parts, outgoing_transfer
from moeforge.platform.schedules.simulate import Costs, simulate

# Costs used only to order transfers among compute actions; any positive costs give a valid order.
ORDERING_COSTS = Costs(f=1.0, b=2.0, w=1.0, fb=2.5)


def require(cond: bool, param: str, message: str) -> None:
    """Raise ScheduleError('param: message') unless cond holds."""
    if not cond:
        raise ScheduleError(f"{param}: {message}")


def require_basic(pp: int, num_microbatches: int) -> None:
    require(isinstance(pp, int) and pp >= 1, "pp", f"must be an integer >= 1, got {pp!r}")
    require(
        isinstance(num_microbatches, int) and num_microbatches >= 1,
        "microbatches",
        f"must be an integer >= 1, got {num_microbatches!r}",
    )


class RankBuilder:
    """Appends compute actions for one rank, handing out micro-batch numbers per chunk in order and
    keeping the FIFO of input-gradient backwards whose W is still to come."""

    def __init__(self, mb_ranges: list[range]):
        self.next_f = [iter(r) for r in mb_ranges]
        self.next_b = [iter(r) for r in mb_ranges]
        self.pending_w: deque[tuple[int, int]] = deque()
        self.actions: list[Action] = []

    def _take(self, counters: list, chunk: int) -> int:
        try:
            return next(counters[chunk])
        except StopIteration:
            raise ScheduleError(f"generator bug: chunk {chunk} ran out of micro-batches") from None

    def forward(self, chunk: int) -> None:
        self.actions.append(Action(Kind.F, chunk, self._take(self.next_f, chunk)))

    def backward(self, chunk: int, split: bool = False) -> None:
        """A full backward (BW), or with split=True an input-gradient B whose W is queued."""
        mb = self._take(self.next_b, chunk)
        if split:
            self.pending_w.append((chunk, mb))
        self.actions.append(Action(Kind.B if split else Kind.BW, chunk, mb))

    def forward_backward(self, f_chunk: int, b_chunk: int, split: bool = False) -> None:
        """Overlapped forward of the next micro-batch of f_chunk with the next backward of b_chunk."""
        f_mb = self._take(self.next_f, f_chunk)
        b_mb = self._take(self.next_b, b_chunk)
        if split:
            self.pending_w.append((b_chunk, b_mb))
        kind = Kind.B if split else Kind.BW
        self.actions.append(Action(Kind.FB, f_chunk, f_mb, b_chunk=b_chunk, b_mb=b_mb, b_kind=kind))

    def weight(self) -> None:
        """The W of the oldest split backward."""
        if not self.pending_w:
            raise ScheduleError("generator bug: W requested with no pending split backward")
        chunk, mb = self.pending_w.popleft()
        self.actions.append(Action(Kind.W, chunk, mb))


def add_transfers(schedule: Schedule) -> Schedule:
    """Return `schedule` with every SEND/RECV pair inserted (see the module docstring)."""
    sim = simulate(schedule, ORDERING_COSTS)
    events = []  # (time, priority, rank, index, seq, [(rank, action), ...]); transfers before compute
    for span in sim.spans:
        events.append((span.start, 1, span.rank, span.index, 0, [(span.rank, span.action)]))
        for seq, (step, chunk, mb) in enumerate(compute_parts(span.action), start=1):
            t = outgoing_transfer(schedule, span.rank, step, chunk, mb)
            if t is not None:
                events.append(
                    (span.end, 0, span.rank, span.index, seq, [(t.src_rank, t.send), (t.dst_rank, t.recv)])
                )
    events.sort(key=lambda e: e[:5])
    lists: list[list[Action]] = [[] for _ in range(schedule.pp)]
    for *_, placed in events:
        for rank, action in placed:
            lists[rank].append(action)
    return replace(schedule, actions=lists)


def linear_schedule(name: str, pp: int, num_microbatches: int, lists: list[list[Action]]) -> Schedule:
    """A one-chunk-per-rank schedule (rank r = stage r) from compute lists, with transfers placed.
    Claimed peak: rank r holds at most pp-r micro-batches in flight (fewer when M is smaller)."""
    schedule = Schedule(
        name=name,
        pp=pp,
        num_microbatches=num_microbatches,
        chunks_per_rank=1,
        num_stages=pp,
        actions=lists,
        claimed_peak_activations=[min(pp - r, num_microbatches) for r in range(pp)],
        param_copies=1,
        layout="linear",
    )
    return add_transfers(schedule)
