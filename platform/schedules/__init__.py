"""Pipeline schedules as data: per-rank action lists, their generators, validator and simulator.

Typical use: `build_schedule("dualpipe", pp=8, num_microbatches=20)` gives a `Schedule` whose
`actions[rank]` the runtime executes; `validate(schedule)` proves the lists executable and
`simulate(schedule, Costs(f=1, b=2, w=1, fb=2.5))` reports bubbles, makespan and peak activations.
"""

from __future__ import annotations

from moeforge.platform.schedules.actions import Action, Kind, Schedule, ScheduleError, parse_action
from moeforge.platform.schedules.dualpipe import dualpipe
from moeforge.platform.schedules.dualpipev import dualpipev
from moeforge.platform.schedules.forward_only import forward_only
from moeforge.platform.schedules.onef1b import one_f_one_b
from moeforge.platform.schedules.simulate import Costs, SimResult, simulate
from moeforge.platform.schedules.validate import validate
from moeforge.platform.schedules.zb1p import zb1p

GENERATORS = {
    "1f1b": one_f_one_b,
    "zb1p": zb1p,
    "dualpipe": dualpipe,
    "dualpipev": dualpipev,
}


def build_schedule(name: str, pp: int, num_microbatches: int) -> Schedule:
    """The action lists of schedule `name` for `pp` ranks and `num_microbatches` micro-batches, with
    SEND/RECV pairs placed. Raises ScheduleError naming the bad parameter."""
    if name not in GENERATORS:
        raise ScheduleError(f"schedule: must be one of {sorted(GENERATORS)}, got {name!r}")
    return GENERATORS[name](pp, num_microbatches)


__all__ = [
    "GENERATORS",
    "Action",
    "Costs",
    "Kind",
    "Schedule",
    "ScheduleError",
    "SimResult",
    "build_schedule",
    "forward_only",
    "parse_action",
    "simulate",
    "validate",
]
