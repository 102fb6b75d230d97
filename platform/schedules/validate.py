"""Prove that a schedule's action lists are executable.

`validate(schedule)` checks, and raises ScheduleError naming the rank and action on the first violation:

1. every action names an existing chunk, micro-batch (in its chunk's direction for DualPipe) and peer;
2. on every rank, each (chunk, micro-batch) that passes it is forwarded exactly once and backwarded
   exactly once (a `forward_only` schedule: forwarded once, never backwarded); a split backward
   (B, or an FB with a B half) has exactly one W later, a full backward (BW, or an FB with a BW
   half) has none;
3. every cross-rank input has exactly one SEND on the producer and one RECV on the consumer (and no
   transfer is superfluous);
4. NCCL's matching: for every direction between two ranks, the producer's SENDs and the consumer's
   RECVs name the same transfers in the same list order. The executor gives each direction its own
   process group and posts sends and receives in list order (`platform.engine.p2p.P2P`), and NCCL,
   which has no tags, pairs the k-th send of a (group, pair) with the k-th receive: lists that
   disagree would deliver one micro-batch's tensor (of the same shape) as another's, or hang;
5. the lists run to completion under BLOCKING point-to-point semantics: a SEND and its RECV complete
   together, each waiting for the other (rendezvous), so every rank must reach a matching pair in a
   compatible order. Compute actions need their local inputs (F before its B, B before its W, the same
   rank's previous stage for the V turn) and their remote inputs already received by an earlier RECV;
   a SEND needs its data already computed. Together these make every micro-batch pass every stage
   forward, then backward, in stage order. With tag matching (gloo), posting receives ahead or
   sending asynchronously only relaxes this, so such a runtime cannot deadlock either. Under NCCL
   that holds only with (4) and a stream per direction: two ranks that each post a receive ahead
   on ONE (group, pair) stream wait for each other forever, whatever the lists say;
6. the number of live activations on each rank (from the start of an F to the end of its
   input-gradient backward) never exceeds `schedule.claimed_peak_activations[rank]`.
"""

from __future__ import annotations

from collections import Counter

from moeforge.platform.schedules.actions import Action, Kind, Schedule, ScheduleError
from moeforge.platform.schedules.dataflow import (
    Work,
    check_action_range,
    compute_parts,
    expected_work,
    needs,
    transfer_for,
)
from moeforge.platform.schedules.simulate import needed_transfers


def validate(schedule: Schedule) -> None:
    """Raise ScheduleError unless the schedule is executable (see the module docstring)."""
    for rank, acts in enumerate(schedule.actions):
        for index, action in enumerate(acts):
            check_action_range(schedule, rank, index, action)
    for rank in range(schedule.pp):
        _check_work_counts(schedule, rank)
    _check_transfers(schedule)
    _check_direction_order(schedule)
    _run_blocking(schedule)
    for rank in range(schedule.pp):
        _check_activations(schedule, rank)


def _check_work_counts(schedule: Schedule, rank: int) -> None:
    expected = expected_work(schedule, rank)
    counts: Counter = Counter()
    split: set[tuple[int, int]] = set()
    for action in schedule.actions[rank]:
        for step, chunk, mb in compute_parts(action):
            if (chunk, mb) not in expected:
                raise ScheduleError(
                    f"rank {rank}: {action}: micro-batch {mb} does not pass chunk {chunk} here"
                )
            counts[step, chunk, mb] += 1
        half = action.backward_half or action
        if half.kind is Kind.B:
            split.add((half.chunk, half.mb))
    for chunk, mb in sorted(expected):
        for step in ("F",) if schedule.forward_only else ("F", "B"):
            if counts[step, chunk, mb] != 1:
                raise ScheduleError(
                    f"rank {rank}: {step}{chunk}.{mb} appears {counts[step, chunk, mb]} times, expected once"
                )
        if schedule.forward_only:
            if counts["B", chunk, mb] or counts["W", chunk, mb]:
                raise ScheduleError(
                    f"rank {rank}: chunk {chunk} micro-batch {mb}: a forward-only list has a backward"
                )
            continue
        if counts["W", chunk, mb] != 1:  # from its BW, or from the W after a split B
            what = "its split B needs exactly one W" if (chunk, mb) in split else "its BW already computed it"
            raise ScheduleError(
                f"rank {rank}: weight gradient of chunk {chunk} micro-batch {mb} computed "
                f"{counts['W', chunk, mb]} times ({what})"
            )


def _check_transfers(schedule: Schedule) -> None:
    needed = needed_transfers(schedule)
    sends: Counter = Counter()
    recvs: Counter = Counter()
    for rank, acts in enumerate(schedule.actions):
        for action in acts:
            if action.kind in (Kind.SEND_F, Kind.SEND_B):
                sends[rank, action] += 1
            elif action.kind in (Kind.RECV_F, Kind.RECV_B):
                recvs[rank, action] += 1
    for t in sorted(needed, key=lambda t: (t.src_rank, t.dst_rank, t.kind.value, t.chunk, t.mb)):
        if sends[t.src_rank, t.send] != 1:
            raise ScheduleError(
                f"rank {t.src_rank}: expected exactly one {t.send} (rank {t.dst_rank} needs it), "
                f"found {sends[t.src_rank, t.send]}"
            )
        if recvs[t.dst_rank, t.recv] != 1:
            raise ScheduleError(
                f"rank {t.dst_rank}: expected exactly one {t.recv} (its input from rank {t.src_rank}), "
                f"found {recvs[t.dst_rank, t.recv]}"
            )
    wanted = {(t.src_rank, t.send) for t in needed} | {(t.dst_rank, t.recv) for t in needed}
    for rank, action in list(sends) + list(recvs):
        if (rank, action) not in wanted:
            raise ScheduleError(
                f"rank {rank}: {action} transfers data no stage needs (wrong peer, chunk or kind?)"
            )


def _check_direction_order(schedule: Schedule) -> None:
    """(4): per (sender, receiver), the sender's SENDs and the receiver's RECVs in the same order."""
    sends: dict[tuple[int, int], list[Action]] = {}
    recvs: dict[tuple[int, int], list[Action]] = {}
    for rank, acts in enumerate(schedule.actions):
        for action in acts:
            if action.kind in (Kind.SEND_F, Kind.SEND_B):
                sends.setdefault((rank, action.peer), []).append(action)
            elif action.kind in (Kind.RECV_F, Kind.RECV_B):
                recvs.setdefault((action.peer, rank), []).append(action)
    for (sender, receiver), sent in sorted(sends.items()):
        received = recvs.get((sender, receiver), [])
        for k, (s, r) in enumerate(zip(sent, received, strict=True)):  # counts: _check_transfers
            if _matching(s, sender) != r:
                raise ScheduleError(
                    f"rank {sender} -> rank {receiver}: transfer #{k} is {s} on rank {sender} but {r} on "
                    f"rank {receiver}; NCCL pairs the transfers of one direction in posting order, so "
                    "both lists must name them in the same order"
                )


def _matching(action: Action, rank: int) -> Action:
    """The action the peer must be at for `action` on `rank` to complete."""
    partner = {
        Kind.SEND_F: Kind.RECV_F,
        Kind.RECV_F: Kind.SEND_F,
        Kind.SEND_B: Kind.RECV_B,
        Kind.RECV_B: Kind.SEND_B,
    }
    return Action(partner[action.kind], action.chunk, action.mb, peer=rank)


def _run_blocking(schedule: Schedule) -> None:
    """Execute the lists with rendezvous send/recv; raise on an order error or a deadlock."""
    lists = schedule.actions
    ptr = [0] * schedule.pp
    done: set[Work] = set()
    received: set[Work] = set()  # (step, consumer rank, consumer chunk, mb)

    def run_compute(rank: int, action: Action) -> None:
        for step, chunk, mb in compute_parts(action):
            for dep in needs(schedule, rank, step, chunk, mb):
                if dep.rank == rank:
                    if dep not in done:
                        raise ScheduleError(
                            f"rank {rank}: {action} runs before {dep.step}{dep.chunk}.{dep.mb} on this rank"
                        )
                elif Work(step, rank, chunk, mb) not in received:
                    t = transfer_for(schedule, rank, step, chunk, mb)
                    raise ScheduleError(
                        f"rank {rank}: {action} runs before its input arrives ({t.recv} must come first)"
                    )
            done.add(Work(step, rank, chunk, mb))

    finished = 0
    total = sum(len(acts) for acts in lists)
    while finished < total:
        progressed = False
        for rank in range(schedule.pp):
            while ptr[rank] < len(lists[rank]):
                action = lists[rank][ptr[rank]]
                if action.kind.is_compute:
                    run_compute(rank, action)
                    ptr[rank] += 1
                    finished += 1
                    progressed = True
                    continue
                send = action if action.kind in (Kind.SEND_F, Kind.SEND_B) else None
                if send is not None:
                    step = "F" if send.kind is Kind.SEND_F else "B"
                    produced = Work(step, rank, schedule.producer_chunk(send, rank), send.mb)
                    if produced not in done:
                        raise ScheduleError(
                            f"rank {rank}: {send} comes before the compute that produces its data"
                        )
                peer = action.peer
                if ptr[peer] >= len(lists[peer]) or lists[peer][ptr[peer]] != _matching(action, rank):
                    break  # blocked until the peer reaches the matching action
                if send is None:  # we are the receiver: the sender's data must exist
                    peer_send = lists[peer][ptr[peer]]
                    step = "F" if peer_send.kind is Kind.SEND_F else "B"
                    if Work(step, peer, schedule.producer_chunk(peer_send, peer), peer_send.mb) not in done:
                        break  # the sender raises its own error when it gets there
                recv_rank = peer if send is not None else rank
                recv_action = lists[recv_rank][ptr[recv_rank]]
                step = "F" if recv_action.kind is Kind.RECV_F else "B"
                received.add(Work(step, recv_rank, recv_action.chunk, recv_action.mb))
                ptr[rank] += 1
                ptr[peer] += 1
                finished += 2
                progressed = True
        if not progressed:
            stuck = [
                f"rank {r} blocked at {lists[r][ptr[r]]}"
                for r in range(schedule.pp)
                if ptr[r] < len(lists[r])
            ]
            raise ScheduleError("deadlock with blocking send/recv: " + "; ".join(stuck))


def _live_counts(actions: list[Action]):
    """Yield (action, live activations right after its forward part starts) for each action."""
    live = 0
    for action in actions:
        parts = compute_parts(action)
        if parts and parts[0][0] == "F":
            live += 1
            yield action, live
        live -= sum(1 for p in parts if p[0] == "B")


def _check_activations(schedule: Schedule, rank: int) -> None:
    claimed = schedule.claimed_peak_activations[rank]
    for action, live in _live_counts(schedule.actions[rank]):
        if live > claimed:
            raise ScheduleError(
                f"rank {rank}: {action} brings live activations to {live}, above the claimed peak {claimed}"
            )


def peak_live_activations(schedule: Schedule) -> list[int]:
    """Per rank, the most activations live at once when the lists run in order."""
    return [max((live for _, live in _live_counts(acts)), default=0) for acts in schedule.actions]
