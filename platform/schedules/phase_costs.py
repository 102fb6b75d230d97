"""The cost of DualPipe's overlapped F&B pair from its phases: what parallel.overlap can gain.

A chunk's forward and backward are programs of compute phases with a transfer (an MoE all-to-all)
after each phase but the last (platform/runtime/chunk_program.py). The overlapped pair runs the
two programs phase by phase in turn, as `chunk_program.interleave` does: forward phase 0,
backward phase 0, forward phase 1, ... A phase starts when the compute is free and its own
program's previous transfer has arrived. Transfers go over one link in launch order: both
programs' all-to-alls are collectives of the same EP group, which gloo (one queue per group) and
NCCL (one stream) run one after another.

    sequential  sum(compute) + sum(transfers)          (parallel.overlap=false)
    overlapped  simulated below; = sum(compute) when every transfer is shorter than the compute
                the other program runs meanwhile

For V3's shape (3 compute phases and 2 all-to-alls per direction, all phases x, all transfers y)
the overlapped pair takes 6x when y <= x and 2x + 4y when y >= x (tests/test_phase_costs.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from moeforge.platform.schedules.actions import ScheduleError


@dataclass(frozen=True)
class ProgramCosts:
    """One program: compute phase durations, and the transfer after each phase but the last."""

    compute: tuple[float, ...]
    transfers: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "compute", tuple(float(c) for c in self.compute))
        object.__setattr__(self, "transfers", tuple(float(t) for t in self.transfers))
        if not self.compute:
            raise ScheduleError("phase costs: a program needs at least one compute phase")
        if len(self.transfers) != len(self.compute) - 1:
            raise ScheduleError(
                f"phase costs: {len(self.compute)} compute phases need {len(self.compute) - 1} transfers "
                f"between them, got {len(self.transfers)}"
            )
        if min(self.compute + self.transfers) < 0:
            raise ScheduleError("phase costs: durations must be >= 0")

    @property
    def sequential(self) -> float:
        return sum(self.compute) + sum(self.transfers)


@dataclass(frozen=True)
class PairTime:
    """An F&B pair's predicted time, with and without interleaving."""

    overlapped: float
    sequential: float
    compute: float  # the pair's compute alone: no schedule does better
    transfers: float

    @property
    def exposed_transfer(self) -> float:
        """Transfer time the overlapped pair still waits for."""
        return self.overlapped - self.compute

    @property
    def hidden_fraction(self) -> float:
        """Share of the transfer time hidden behind compute (1.0 with no transfers)."""
        return 1.0 if self.transfers == 0 else 1.0 - self.exposed_transfer / self.transfers


def overlapped_pair(forward: ProgramCosts, backward: ProgramCosts) -> PairTime:
    """Simulate the interleaved pair (see module docstring)."""
    programs = (forward, backward)
    next_phase = [0, 0]
    ready = [0.0, 0.0]  # when each program's next phase may start (its last transfer arrived)
    compute_free = link_free = 0.0
    while any(next_phase[i] < len(p.compute) for i, p in enumerate(programs)):
        for i, program in enumerate(programs):
            k = next_phase[i]
            if k == len(program.compute):
                continue
            start = max(compute_free, ready[i])
            compute_free = start + program.compute[k]
            ready[i] = compute_free
            if k < len(program.transfers):  # launched now, carried after the link's earlier transfers
                link_start = max(link_free, compute_free)
                link_free = link_start + program.transfers[k]
                ready[i] = link_free
            next_phase[i] = k + 1
    return PairTime(
        overlapped=compute_free,
        sequential=forward.sequential + backward.sequential,
        compute=sum(forward.compute) + sum(backward.compute),
        transfers=sum(forward.transfers) + sum(backward.transfers),
    )


@dataclass
class PhaseCostsConfig:
    """`phases` of moeforge-schedule: one chunk's forward and full backward as compute phases and the
    transfers between them (per chunk, in the units of `cost`)."""

    forward: list[float]
    forward_transfers: list[float]
    backward: list[float]
    backward_transfers: list[float]

    def __post_init__(self) -> None:
        self.programs()  # validates both

    def programs(self) -> tuple[ProgramCosts, ProgramCosts]:
        return (
            ProgramCosts(tuple(self.forward), tuple(self.forward_transfers)),
            ProgramCosts(tuple(self.backward), tuple(self.backward_transfers)),
        )

    def pair(self) -> PairTime:
        return overlapped_pair(*self.programs())

    def costs(self, base, overlap: bool):
        """`base` (a simulate.Costs: w and comm kept) with f, b and fb from the phases: fb is the
        overlapped pair's time with `overlap`, else the two programs back to back."""
        from moeforge.platform.schedules.simulate import Costs

        forward, backward = self.programs()
        fb = self.pair().overlapped if overlap else forward.sequential + backward.sequential
        return Costs(forward.sequential, backward.sequential, base.w, fb, base.comm)
