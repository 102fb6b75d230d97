"""The cost of DualPipe's overlapped F&B pair from its phases: what parallel.overlap can gain.

A chunk's forward and backward are programs of compute phases with a transfer (an MoE all-to-all)
after each phase but the last (`platform.engine.chunk_program.ChunkProgram`). The overlapped pair runs the
two programs phase by phase in turn, as `chunk_program.run_pair` does: with parallel.overlap_order
backward_first (the default), backward phase 0, forward phase 0, backward phase 1, ...; with
forward_first the other way round. A phase starts when the compute is free and its own
program's previous transfer has arrived. Transfers go over one link in launch order: both
programs' all-to-alls are collectives of the same EP group, which gloo (one queue per group) and
NCCL (one stream) run one after another.

    sequential  sum(compute) + sum(transfers)          (parallel.overlap=false)
    overlapped  simulated below; = sum(compute) when every transfer is shorter than the compute
                the other program runs meanwhile

For V3's shape (3 compute phases and 2 all-to-alls per direction, all phases x, all transfers y)
the overlapped pair takes 6x when y <= x and 2x + 4y when y >= x, in either order
(`tests.test_phase_costs`: `test_transfers_shorter_than_the_other_compute_are_hidden`,
`test_longer_transfers_serialise_on_the_link`). The order matters when phases differ: a chunk ending
in a short phase (the head, a residual) hides its transfers only backward first, since the backward
then opens with that short phase and the forward's long first phase covers its transfer.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeforge.platform.config.parallel import OVERLAP_ORDERS
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


def overlapped_pair(forward: ProgramCosts, backward: ProgramCosts, order: str = "backward_first") -> PairTime:
    """Simulate the interleaved pair (see module docstring); `order` as parallel.overlap_order."""
    if order not in OVERLAP_ORDERS:
        raise ScheduleError(f"phase costs: order must be {' or '.join(OVERLAP_ORDERS)}, got {order!r}")
    programs = (backward, forward) if order == "backward_first" else (forward, backward)
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


def pair_costs(
    forward: ProgramCosts,
    backward: ProgramCosts,
    w: float,
    overlap: bool,
    comm: float = 0.0,
    order: str = "backward_first",
):
    """The simulator's per-action costs from a chunk's phase programs (`backward`: the full backward,
    its weight gradient `w` included): f and b run their programs back to back; fb is the overlapped
    pair's time with `overlap`, else the two programs one after the other."""
    from moeforge.platform.schedules.simulate import Costs

    if overlap:
        fb = overlapped_pair(forward, backward, order).overlapped
    else:
        fb = forward.sequential + backward.sequential
    return Costs(forward.sequential, backward.sequential, w, fb, comm)


@dataclass
class PhaseCostsConfig:
    """`phases` of moeforge-schedule: one chunk's forward and full backward as compute phases and the
    transfers between them (per chunk, in the units of `cost`)."""

    forward: list[float]
    forward_transfers: list[float]
    backward: list[float]
    backward_transfers: list[float]
    order: str = "backward_first"  # whose phase opens the pair, as parallel.overlap_order

    def __post_init__(self) -> None:
        self.programs()  # validates both
        overlapped_pair(*self.programs(), self.order)  # validates the order

    def programs(self) -> tuple[ProgramCosts, ProgramCosts]:
        return (
            ProgramCosts(tuple(self.forward), tuple(self.forward_transfers)),
            ProgramCosts(tuple(self.backward), tuple(self.backward_transfers)),
        )

    def pair(self) -> PairTime:
        return overlapped_pair(*self.programs(), self.order)

    def costs(self, base, overlap: bool):
        """`base` (a simulate.Costs: w and comm kept) with f, b and fb from the phases (pair_costs)."""
        return pair_costs(*self.programs(), base.w, overlap, base.comm, self.order)
