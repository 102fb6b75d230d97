"""Discrete-event simulation of a schedule's action lists with per-action costs.

Model (what the runtime does): each rank runs its list in order, one compute action at a time. A compute
action starts when its rank is free AND all its inputs are available. A SEND takes no rank time and
never blocks (the runtime posts receives ahead of need); its data is available on the peer `comm` time
units after the SEND is reached. A RECV takes no time. Lists without any SEND/RECV (compute-only lists)
are simulated as if every output were sent the moment it is produced.

Costs (`Costs`): `f` forward of one chunk; `b` FULL backward of one chunk (input + weight gradient, the
"B" of the DualPipe table); `w` the weight-gradient part alone; `fb` an overlapped forward + full
backward pair ("F&B"). Derived action costs: F=f, BW=b, B=b-w (input gradient only), W=w,
F&BW=fb, F&B=fb-w (the W of a split backward half is paid later by its own W action).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moeforge.platform.outputs.timeline import TimelineRecord
from moeforge.platform.schedules.actions import Action, Kind, Schedule, ScheduleError
from moeforge.platform.schedules.dataflow import Work, compute_parts, needs, transfer_for


@dataclass(frozen=True)
class Costs:
    """Per-action costs in arbitrary time units. `fb` defaults to f + b (no overlap benefit)."""

    f: float = 1.0
    b: float = 2.0
    w: float = 1.0
    fb: float | None = None
    comm: float = 0.0

    def __post_init__(self) -> None:
        if self.fb is None:
            object.__setattr__(self, "fb", self.f + self.b)
        for name in ("f", "b", "w", "fb", "comm"):
            if getattr(self, name) < 0:
                raise ScheduleError(f"cost.{name}: must be >= 0, got {getattr(self, name)}")
        if self.w > self.b:
            raise ScheduleError(
                f"cost.w: the weight-gradient part ({self.w}) cannot exceed the full backward b ({self.b})"
            )
        if self.fb < self.w:
            raise ScheduleError(f"cost.fb: must be >= cost.w ({self.w}), got {self.fb}")

    def scaled(self, factor: float) -> Costs:
        """Compute costs times `factor` (comm unchanged): e.g. 0.5 turns stage costs into the costs of
        DualPipeV's half-stage chunks."""
        return Costs(self.f * factor, self.b * factor, self.w * factor, self.fb * factor, self.comm)

    def of(self, action: Action) -> float:
        k = action.kind
        if k is Kind.F:
            return self.f
        if k is Kind.B:
            return self.b - self.w
        if k is Kind.W:
            return self.w
        if k is Kind.BW:
            return self.b
        if k is Kind.FB:
            return self.fb if action.b_kind is Kind.BW else self.fb - self.w
        return 0.0


@dataclass
class Span:
    rank: int
    index: int  # position in the rank's action list
    action: Action
    start: float
    end: float


@dataclass
class SimResult:
    """busy[r]: compute time of rank r; idle[r] = makespan - busy[r] (its bubble); makespan: time the
    last action ends (all ranks start at 0); peak_activations[r]: most (chunk, micro-batch) activations
    live at once on rank r (live from the start of the F to the end of the input-gradient backward);
    peak_activation_units[r]: the same in units of one stage of a pp-stage model (DualPipeV's chunks are
    half-stages, so its count is halved); param_copies: Schedule.param_copies; param_memory: parameters
    per rank relative to one stage of a pp-stage model (chunks_per_rank * pp / num_stages)."""

    name: str
    pp: int
    num_microbatches: int
    makespan: float
    busy: list[float]
    idle: list[float]
    peak_activations: list[int]
    peak_activation_units: list[float]
    param_copies: int
    param_memory: float
    spans: list[Span] = field(repr=False, default_factory=list)

    @property
    def bubble(self) -> list[float]:
        return self.idle

    def records(self) -> list[TimelineRecord]:
        """Timeline records of the compute actions (label = the action's string form)."""
        return [
            TimelineRecord(s.rank, str(s.action), s.action.kind.value, s.start, s.end)
            for s in self.spans
            if s.action.kind.is_compute
        ]

    def to_dict(self) -> dict:
        return {
            "schedule": self.name,
            "pp": self.pp,
            "microbatches": self.num_microbatches,
            "makespan": self.makespan,
            "busy": self.busy,
            "bubble": self.idle,
            "peak_activations": self.peak_activations,
            "peak_activation_units": self.peak_activation_units,
            "param_copies": self.param_copies,
            "param_memory": self.param_memory,
        }


def simulate(schedule: Schedule, costs: Costs) -> SimResult:
    """Simulate `schedule` with `costs`; raises ScheduleError if some rank can never proceed."""
    lists = schedule.actions
    explicit_comm = any(a.kind.is_comm for acts in lists for a in acts)
    done: dict[Work, float] = {}  # work item -> end time
    arrival: dict[Work, float] = {}  # remote input (as the consumer's work it feeds) -> arrival time
    ptr = [0] * schedule.pp
    clock = [0.0] * schedule.pp
    live = [0] * schedule.pp
    peak = [0] * schedule.pp
    busy = [0.0] * schedule.pp
    spans: list[Span] = []

    def input_time(rank: int, action: Action) -> float | None:
        """When all inputs of a compute action are available on `rank`; None if not yet known."""
        ready = 0.0
        parts = compute_parts(action)
        for i, (step, chunk, mb) in enumerate(parts):
            for dep in needs(schedule, rank, step, chunk, mb):
                if dep.rank == rank:
                    if (dep.step, dep.chunk, dep.mb) in parts[:i]:
                        continue  # the W of a BW follows its own B
                    if (dep.step, dep.chunk, dep.mb) in parts:
                        raise ScheduleError(f"rank {rank}: {action} depends on itself")
                    if dep not in done:
                        raise ScheduleError(
                            f"rank {rank}: {action} needs {dep.step}{dep.chunk}.{dep.mb} first"
                        )
                    ready = max(ready, done[dep])
                    continue
                if explicit_comm:
                    key = Work(step, rank, chunk, mb)
                    if key not in arrival:
                        return None
                    ready = max(ready, arrival[key])
                else:
                    if dep not in done:
                        return None
                    ready = max(ready, done[dep] + costs.comm)
        return ready

    total = sum(len(acts) for acts in lists)
    executed = 0
    while executed < total:
        progressed = False
        for rank in range(schedule.pp):
            while ptr[rank] < len(lists[rank]):
                action = lists[rank][ptr[rank]]
                if action.kind.is_compute:
                    ready = input_time(rank, action)
                    if ready is None:
                        break
                    start = max(clock[rank], ready)
                    end = start + costs.of(action)
                    parts = compute_parts(action)
                    if parts[0][0] == "F":
                        live[rank] += 1
                        peak[rank] = max(peak[rank], live[rank])
                    live[rank] -= sum(1 for p in parts if p[0] == "B")
                    for step, chunk, mb in parts:
                        done[Work(step, rank, chunk, mb)] = end
                    clock[rank] = end
                    busy[rank] += end - start
                    spans.append(Span(rank, ptr[rank], action, start, end))
                elif action.kind in (Kind.SEND_F, Kind.SEND_B):
                    step = "F" if action.kind is Kind.SEND_F else "B"
                    produced = Work(step, rank, schedule.producer_chunk(action, rank), action.mb)
                    if produced not in done:
                        raise ScheduleError(
                            f"rank {rank}: {action} sends data this rank has not produced yet"
                        )
                    arrival[Work(step, action.peer, action.chunk, action.mb)] = clock[rank] + costs.comm
                    spans.append(Span(rank, ptr[rank], action, clock[rank], clock[rank]))
                else:
                    spans.append(Span(rank, ptr[rank], action, clock[rank], clock[rank]))
                ptr[rank] += 1
                executed += 1
                progressed = True
        if not progressed:
            stuck = [f"rank {r} at {lists[r][ptr[r]]}" for r in range(schedule.pp) if ptr[r] < len(lists[r])]
            raise ScheduleError("simulation cannot proceed (missing input or deadlock): " + ", ".join(stuck))

    makespan = max(clock) if clock else 0.0
    scale = schedule.pp / schedule.num_stages
    return SimResult(
        name=schedule.name,
        pp=schedule.pp,
        num_microbatches=schedule.num_microbatches,
        makespan=makespan,
        busy=busy,
        idle=[makespan - b for b in busy],
        peak_activations=peak,
        peak_activation_units=[p * scale for p in peak],
        param_copies=schedule.param_copies,
        param_memory=schedule.chunks_per_rank * scale,
        spans=spans,
    )


def needed_transfers(schedule: Schedule) -> set:
    """Every cross-rank transfer the schedule's compute actions need (for validation and insertion)."""
    out = set()
    for rank, acts in enumerate(schedule.actions):
        for action in acts:
            for step, chunk, mb in compute_parts(action):
                t = transfer_for(schedule, rank, step, chunk, mb)
                if t is not None:
                    out.add(t)
    return out
