"""The action vocabulary of a pipeline schedule, and the `Schedule` that holds per-rank action lists.

A schedule is data: for every pipeline rank, the list of actions it executes in order. The same lists
feed the executor (platform runtime), the validator, the simulator and the timeline plots.

String forms (used in logs, tests and schedule files; `parse_action(str(a)) == a` always holds):

    F0.3          forward of local chunk 0, micro-batch 3
    B1.5          input-gradient backward of chunk 1, micro-batch 5 (a W1.5 follows later)
    W0.2          weight-gradient of chunk 0, micro-batch 2 (after its B)
    BW0.4         full backward (input and weight gradients) of chunk 0, micro-batch 4
    F0.6&B1.2     overlapped pair: forward F0.6 computed together with the backward of chunk 1,
                  micro-batch 2; the backward half is input-gradient only (its W1.2 comes later)
    F0.6&BW1.2    the same, but the backward half is a full backward (no W follows)
    SEND_F0.3>2   send activations for chunk 0, micro-batch 3 to rank 2
    RECV_F0.3<1   receive activations for chunk 0, micro-batch 3 from rank 1
    SEND_B1.5>3   send the input gradient for chunk 1, micro-batch 5 to rank 3
    RECV_B1.5<0   receive the output gradient for chunk 1, micro-batch 5 from rank 0

Transfers, precisely. A transfer moves one tensor set between two ranks and is written twice: a SEND
on the producer's list and a RECV on the consumer's list. Both carry the SAME (chunk, mb): the local
chunk index on the CONSUMING rank that will use the data, and the micro-batch. `peer` is the other
rank. SEND_F/RECV_F carry the forward output of stage s into stage s+1 (consumer: the chunk holding
stage s+1); SEND_B/RECV_B carry the gradient w.r.t. the input of stage s+1 back into stage s (consumer:
the chunk holding stage s). In every layout moeforge defines (linear, bidirectional, v), a transfer
links equal local chunk indices on the two ranks, so the producer's own chunk is the same number;
`Schedule.producer_chunk` gives it in general. Hand-offs between two chunks of the SAME rank (the
turn of the V in DualPipeV) are local and have no SEND/RECV.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field


class ScheduleError(ValueError):
    """A schedule parameter or action list is invalid. The message names the parameter, rank or action."""


class Kind(enum.Enum):
    F = "F"  # forward
    B = "B"  # input-gradient backward (split schedules: a W of the same chunk/mb follows later)
    W = "W"  # weight-gradient backward
    BW = "BW"  # full backward (B + W at once)
    FB = "FB"  # overlapped forward of (chunk, mb) with a backward of (b_chunk, b_mb)
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"

    @property
    def is_comm(self) -> bool:
        return self in _COMM

    @property
    def is_compute(self) -> bool:
        return self not in _COMM


_COMM = frozenset({Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B})


@dataclass(frozen=True)
class Action:
    """One step of a rank's schedule. See the module docstring for the string forms.

    kind:    what to do.
    chunk:   local chunk index on this rank (0, or 0/1 for two-chunk schedules); for FB the forward half;
             for SEND/RECV the consumer's local chunk (module docstring).
    mb:      micro-batch index (global: DualPipe numbers the reverse direction M/2..M-1).
    peer:    the other rank of a SEND/RECV; None for compute actions.
    b_chunk, b_mb: the backward half of an FB.
    b_kind:  the backward half of an FB: Kind.B (input-gradient only, a W follows later; the default)
             or Kind.BW (full backward, as in DualPipe's overlapped steps). None for other kinds.
    """

    kind: Kind
    chunk: int
    mb: int
    peer: int | None = None
    b_chunk: int | None = None
    b_mb: int | None = None
    b_kind: Kind | None = field(default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, Kind):
            raise ScheduleError(f"action kind must be a Kind, got {self.kind!r}")
        if self.chunk < 0 or self.mb < 0:
            raise ScheduleError(
                f"action {self.kind.name}: chunk and mb must be >= 0, got {self.chunk}.{self.mb}"
            )
        if self.kind is Kind.FB:
            if self.b_chunk is None or self.b_mb is None:
                raise ScheduleError("FB action needs b_chunk and b_mb (its backward half)")
            if self.b_kind is None:
                object.__setattr__(self, "b_kind", Kind.B)
            if self.b_kind not in (Kind.B, Kind.BW):
                raise ScheduleError(f"FB action: b_kind must be Kind.B or Kind.BW, got {self.b_kind}")
        elif self.b_chunk is not None or self.b_mb is not None or self.b_kind is not None:
            raise ScheduleError(f"{self.kind.name} action: b_chunk/b_mb/b_kind are only for FB")
        if self.kind.is_comm:
            if self.peer is None or self.peer < 0:
                raise ScheduleError(f"{self.kind.name} action needs a peer rank >= 0")
        elif self.peer is not None:
            raise ScheduleError(f"{self.kind.name} action takes no peer")

    @property
    def backward_half(self) -> Action | None:
        """For FB: the backward half as a standalone B/BW action; else None."""
        if self.kind is not Kind.FB:
            return None
        return Action(self.b_kind, self.b_chunk, self.b_mb)

    @property
    def forward_half(self) -> Action | None:
        """For FB: the forward half as a standalone F action; else None."""
        return Action(Kind.F, self.chunk, self.mb) if self.kind is Kind.FB else None

    def __str__(self) -> str:
        if self.kind is Kind.FB:
            return f"F{self.chunk}.{self.mb}&{self.b_kind.value}{self.b_chunk}.{self.b_mb}"
        if self.kind in (Kind.SEND_F, Kind.SEND_B):
            return f"{self.kind.value}{self.chunk}.{self.mb}>{self.peer}"
        if self.kind in (Kind.RECV_F, Kind.RECV_B):
            return f"{self.kind.value}{self.chunk}.{self.mb}<{self.peer}"
        return f"{self.kind.value}{self.chunk}.{self.mb}"


# Longest kind names first so "BW" is not read as "B".
_KIND_RE = "|".join(sorted((k.value for k in Kind if k is not Kind.FB), key=len, reverse=True))
_ACTION_RE = re.compile(
    rf"^(?P<kind>{_KIND_RE})(?P<chunk>\d+)\.(?P<mb>\d+)"
    r"(?:(?P<dir>[<>])(?P<peer>\d+)|&(?P<bkind>BW|B)(?P<bchunk>\d+)\.(?P<bmb>\d+))?$"
)


def parse_action(text: str) -> Action:
    """Inverse of `str(action)`: `parse_action("F0.6&B1.2")`. Raises ScheduleError on anything else."""
    m = _ACTION_RE.match(text.strip())
    if m is None:
        raise ScheduleError(
            f"cannot parse action {text!r} (expected forms like F0.3, BW1.2, F0.6&B1.2, SEND_F0.3>2)"
        )
    kind = Kind(m["kind"])
    chunk, mb = int(m["chunk"]), int(m["mb"])
    if m["bkind"] is not None:
        if kind is not Kind.F:
            raise ScheduleError(
                f"cannot parse action {text!r}: only a forward can be overlapped with a backward"
            )
        return Action(
            Kind.FB, chunk, mb, b_chunk=int(m["bchunk"]), b_mb=int(m["bmb"]), b_kind=Kind(m["bkind"])
        )
    if kind.is_comm:
        expected = ">" if kind in (Kind.SEND_F, Kind.SEND_B) else "<"
        if m["dir"] != expected:
            raise ScheduleError(f"cannot parse action {text!r}: {kind.value} needs '{expected}PEER'")
        return Action(kind, chunk, mb, peer=int(m["peer"]))
    if m["dir"] is not None:
        raise ScheduleError(f"cannot parse action {text!r}: a compute action has no peer")
    return Action(kind, chunk, mb)


LAYOUTS = ("linear", "bidirectional", "v")


@dataclass
class Schedule:
    """Per-rank action lists plus the placement of model stages on (rank, local chunk).

    layout (how stages sit on ranks; `num_stages` model stages):
      linear:        1 chunk per rank, rank r holds stage r (1f1b, zb1p). num_stages = pp.
      bidirectional: DualPipe. Rank r holds stage r (chunk 0) and stage pp-1-r (chunk 1) of a pp-stage
                     model. Micro-batches 0..M/2-1 flow through chunk 0 (rank 0 -> pp-1), M/2..M-1
                     through chunk 1 (rank pp-1 -> 0). Each stage lives on two ranks.
      v:             DualPipeV. Rank r holds stage r (chunk 0) and stage 2pp-1-r (chunk 1) of a
                     2pp-stage model; every micro-batch goes down chunk 0 of ranks 0..pp-1, turns on
                     rank pp-1 (a local hand-off) and comes back up chunk 1 of ranks pp-1..0.

    claimed_peak_activations[r]: the most (chunk, micro-batch) activations rank r holds at once, as the
      generator's theory says; the validator checks the lists never exceed it. An activation is live
      from the start of its F to the end of its input-gradient backward (B, BW or an FB's backward half).
    param_copies: how many ranks hold each stage's parameters (2 for DualPipe: their gradients must be
      summed across the two ranks; 1 otherwise, including DualPipeV).
    forward_only: the lists hold forwards only (evaluation); the validator then expects no backward.
    """

    name: str
    pp: int
    num_microbatches: int
    chunks_per_rank: int
    num_stages: int
    actions: list[list[Action]]
    claimed_peak_activations: list[int]
    param_copies: int
    layout: str = "linear"
    forward_only: bool = False  # evaluation's lists (`forward_only.forward_only`): no B or W at all

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ScheduleError(f"layout: must be one of {LAYOUTS}, got {self.layout!r}")
        expected = {"linear": (1, self.pp), "bidirectional": (2, self.pp), "v": (2, 2 * self.pp)}[self.layout]
        if (self.chunks_per_rank, self.num_stages) != expected:
            raise ScheduleError(
                f"layout {self.layout}: expects chunks_per_rank, num_stages = {expected}, "
                f"got {(self.chunks_per_rank, self.num_stages)}"
            )
        if len(self.actions) != self.pp:
            raise ScheduleError(f"actions: expected {self.pp} rank lists, got {len(self.actions)}")
        if len(self.claimed_peak_activations) != self.pp:
            raise ScheduleError(f"claimed_peak_activations: expected {self.pp} values")

    # ---- placement -------------------------------------------------------------------------------
    def _check(self, rank: int, chunk: int) -> None:
        if not (0 <= rank < self.pp and 0 <= chunk < self.chunks_per_rank):
            raise ScheduleError(
                f"no chunk {chunk} on rank {rank} (pp={self.pp}, chunks={self.chunks_per_rank})"
            )

    def stage_of(self, rank: int, chunk: int) -> int:
        """The model stage that local `chunk` of `rank` computes."""
        self._check(rank, chunk)
        if chunk == 0:
            return rank
        return self.pp - 1 - rank if self.layout == "bidirectional" else 2 * self.pp - 1 - rank

    def _step(self, rank: int, chunk: int, direction: int) -> int | None:
        """The rank one stage downstream (direction=+1) or upstream (-1) of (rank, chunk)."""
        self._check(rank, chunk)
        if self.layout == "v":
            stage = self.stage_of(rank, chunk) + direction
            if not 0 <= stage < self.num_stages:
                return None
            return stage if stage < self.pp else 2 * self.pp - 1 - stage
        step = direction if chunk == 0 else -direction  # chunk 1 of DualPipe flows rank pp-1 -> 0
        other = rank + step
        return other if 0 <= other < self.pp else None

    def next_rank(self, rank: int, chunk: int) -> int | None:
        """Where the forward output of (rank, chunk) goes; None at the last stage. For DualPipeV, rank
        pp-1 chunk 0 returns pp-1 itself (the local turn of the V)."""
        return self._step(rank, chunk, +1)

    def prev_rank(self, rank: int, chunk: int) -> int | None:
        """Where the input of (rank, chunk) comes from; None at the first stage (same-rank turn for V)."""
        return self._step(rank, chunk, -1)

    def is_first_stage(self, rank: int, chunk: int) -> bool:
        return self.prev_rank(rank, chunk) is None

    def is_last_stage(self, rank: int, chunk: int) -> bool:
        return self.next_rank(rank, chunk) is None

    def neighbour_chunk(self, rank: int, chunk: int, direction: int) -> int | None:
        """Local chunk index, on the neighbour rank, of the stage one step downstream (+1) or upstream
        (-1) of (rank, chunk); None at the ends."""
        other = self._step(rank, chunk, direction)
        if other is None:
            return None
        stage = self.stage_of(rank, chunk) + direction
        return next(c for c in range(self.chunks_per_rank) if self.stage_of(other, c) == stage)

    def producer_chunk(self, action: Action, rank: int) -> int:
        """For a SEND on `rank`: the local chunk on `rank` that produced the data (the action names the
        consumer's chunk). Equal to action.chunk in every layout defined here."""
        if action.kind is Kind.SEND_F:
            direction = -1  # the consumer's upstream neighbour is us
        elif action.kind is Kind.SEND_B:
            direction = +1
        else:
            raise ScheduleError(f"producer_chunk: {action} is not a SEND")
        chunk = self.neighbour_chunk(action.peer, action.chunk, direction)
        if chunk is None or self._step(action.peer, action.chunk, direction) != rank:
            raise ScheduleError(f"rank {rank}: {action} does not link neighbouring stages")
        return chunk

    def mb_chunk_range(self, chunk_direction: int) -> range:
        """Micro-batches that enter the pipeline in a given direction: for bidirectional, chunk 0
        carries 0..M/2-1 and chunk 1 carries M/2..M-1; otherwise every micro-batch."""
        if self.layout != "bidirectional":
            return range(self.num_microbatches)
        half = self.num_microbatches // 2
        return range(half) if chunk_direction == 0 else range(half, self.num_microbatches)

    def route(self, mb: int) -> list[tuple[int, int]]:
        """(rank, chunk) of every stage micro-batch `mb` passes, in stage order."""
        if not 0 <= mb < self.num_microbatches:
            raise ScheduleError(f"micro-batch {mb} out of range 0..{self.num_microbatches - 1}")
        if self.layout == "linear":
            return [(r, 0) for r in range(self.pp)]
        if self.layout == "v":
            return [(r, 0) for r in range(self.pp)] + [(r, 1) for r in reversed(range(self.pp))]
        if mb in self.mb_chunk_range(0):
            return [(r, 0) for r in range(self.pp)]
        return [(r, 1) for r in reversed(range(self.pp))]

    def __str__(self) -> str:
        return "\n".join(f"rank {r}: " + " ".join(map(str, acts)) for r, acts in enumerate(self.actions))
