"""Forward-only action lists on a training schedule's stage placement: what evaluation runs.

Evaluation must send activations along exactly the routes training uses (which rank holds which
stage, DualPipe's two directions, DualPipeV's same-rank turn), so it runs through the same executor
and the same placement code instead of walking the stages itself. `forward_only(schedule)` keeps the
schedule's layout and micro-batch count and gives every rank the forwards it would compute in
training, ordered by (stage, micro-batch): a GPipe-style fill. That order is a topological order of
the forward dependencies, so the transfers `add_transfers` places are deadlock-free as for any
generated schedule.
"""

from __future__ import annotations

from dataclasses import replace

from moeforge.platform.schedules.actions import Action, Kind, Schedule
from moeforge.platform.schedules.builder import add_transfers


def forward_only(schedule: Schedule) -> Schedule:
    """`schedule`'s placement with only its forward passes (F actions, SEND_F/RECV_F pairs)."""
    work = []  # (stage index on the route, micro-batch, rank, local chunk)
    for mb in range(schedule.num_microbatches):
        for stage, (rank, chunk) in enumerate(schedule.route(mb)):
            work.append((stage, mb, rank, chunk))
    lists: list[list[Action]] = [[] for _ in range(schedule.pp)]
    for _stage, mb, rank, chunk in sorted(work):
        lists[rank].append(Action(Kind.F, chunk, mb))
    forwards = replace(
        schedule,
        name=f"{schedule.name}-forward",
        actions=lists,
        forward_only=True,
        # No backward frees an activation, but forward-only compute keeps none (no autograd graph).
        claimed_peak_activations=[len(actions) for actions in lists],
    )
    return add_transfers(forwards)
