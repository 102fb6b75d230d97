"""What every compute action needs and produces, derived from the stage layout of a `Schedule`.

Shared by the validator, the simulator and the transfer insertion, so the three agree on what
"an input has arrived" means.

A work item is identified by `Work(step, rank, chunk, mb)` with step "F" (forward done), "B" (input
gradient done: by a B, a BW or the backward half of an FB) or "W" (weight gradient done: by a W, a BW,
or an FB whose backward half is BW).
"""

from __future__ import annotations

from typing import NamedTuple

from moeforge.platform.schedules.actions import Action, Kind, Schedule, ScheduleError


class Work(NamedTuple):
    step: str  # "F" | "B" | "W"
    rank: int
    chunk: int
    mb: int


class Transfer(NamedTuple):
    """Data that must cross ranks: produced by `src` work, consumed on `dst_rank`/`dst_chunk`."""

    kind: Kind  # SEND_F or SEND_B (the producer's action kind)
    src_rank: int
    dst_rank: int
    chunk: int  # consumer's local chunk
    mb: int

    @property
    def send(self) -> Action:
        return Action(self.kind, self.chunk, self.mb, peer=self.dst_rank)

    @property
    def recv(self) -> Action:
        recv_kind = Kind.RECV_F if self.kind is Kind.SEND_F else Kind.RECV_B
        return Action(recv_kind, self.chunk, self.mb, peer=self.src_rank)


def compute_parts(action: Action) -> list[tuple[str, int, int]]:
    """The (step, chunk, mb) items an action completes, in order: F0.1&BW1.2 -> F, B, W."""
    k = action.kind
    if k is Kind.F:
        return [("F", action.chunk, action.mb)]
    if k is Kind.B:
        return [("B", action.chunk, action.mb)]
    if k is Kind.W:
        return [("W", action.chunk, action.mb)]
    if k is Kind.BW:
        return [("B", action.chunk, action.mb), ("W", action.chunk, action.mb)]
    if k is Kind.FB:
        parts = [("F", action.chunk, action.mb), ("B", action.b_chunk, action.b_mb)]
        if action.b_kind is Kind.BW:
            parts.append(("W", action.b_chunk, action.b_mb))
        return parts
    return []


def upstream(schedule: Schedule, rank: int, chunk: int, step: str) -> tuple[int, int] | None:
    """(rank, chunk) whose `step` output feeds (rank, chunk)'s `step`: the previous stage for F, the next
    stage for B; None at the pipeline end (first stage's F, last stage's B)."""
    direction = -1 if step == "F" else +1
    other = schedule._step(rank, chunk, direction)
    if other is None:
        return None
    return other, schedule.neighbour_chunk(rank, chunk, direction)


def needs(schedule: Schedule, rank: int, step: str, chunk: int, mb: int) -> list[Work]:
    """Work items that must be complete before (step, chunk, mb) may run on `rank`."""
    if step == "W":
        return [Work("B", rank, chunk, mb)]
    out = []
    if step == "B":
        out.append(Work("F", rank, chunk, mb))
    src = upstream(schedule, rank, chunk, step)
    if src is not None:
        out.append(Work(step, src[0], src[1], mb))
    return out


def transfer_for(schedule: Schedule, rank: int, step: str, chunk: int, mb: int) -> Transfer | None:
    """The cross-rank transfer that feeds (step, chunk, mb) on `rank`, or None (pipeline end, or the
    producer is this same rank)."""
    if step == "W":
        return None
    src = upstream(schedule, rank, chunk, step)
    if src is None or src[0] == rank:
        return None
    return Transfer(Kind.SEND_F if step == "F" else Kind.SEND_B, src[0], rank, chunk, mb)


def expected_work(schedule: Schedule, rank: int) -> set[tuple[int, int]]:
    """(chunk, mb) pairs that must pass through `rank`."""
    out = set()
    for mb in range(schedule.num_microbatches):
        for r, c in schedule.route(mb):
            if r == rank:
                out.add((c, mb))
    return out


def check_action_range(schedule: Schedule, rank: int, index: int, action: Action) -> None:
    """Raise if an action names a chunk, micro-batch or peer that does not exist."""
    where = f"rank {rank} action #{index} {action}"
    pairs = [(action.chunk, action.mb)]
    if action.kind is Kind.FB:
        pairs.append((action.b_chunk, action.b_mb))
    for chunk, mb in pairs:
        if chunk >= schedule.chunks_per_rank:
            raise ScheduleError(f"{where}: chunk {chunk} >= chunks_per_rank {schedule.chunks_per_rank}")
        if mb >= schedule.num_microbatches:
            raise ScheduleError(f"{where}: micro-batch {mb} >= num_microbatches {schedule.num_microbatches}")
        if schedule.layout == "bidirectional" and mb not in schedule.mb_chunk_range(chunk):
            raise ScheduleError(f"{where}: micro-batch {mb} does not flow through chunk {chunk}")
    if action.peer is not None and not (0 <= action.peer < schedule.pp and action.peer != rank):
        raise ScheduleError(f"{where}: peer {action.peer} is not another rank of 0..{schedule.pp - 1}")


def outgoing_transfer(schedule: Schedule, rank: int, step: str, chunk: int, mb: int) -> Transfer | None:
    """The cross-rank transfer that (step, chunk, mb) on `rank` produces, or None (pipeline end, a W,
    or a consumer on this same rank)."""
    if step == "W":
        return None
    direction = +1 if step == "F" else -1
    dst = schedule._step(rank, chunk, direction)
    if dst is None or dst == rank:
        return None
    dst_chunk = schedule.neighbour_chunk(rank, chunk, direction)
    return Transfer(Kind.SEND_F if step == "F" else Kind.SEND_B, rank, dst, dst_chunk, mb)
