"""Run one rank's pipeline action list exactly as the schedule generated it.

The executor owns ordering and communication; what a forward or backward *computes* is delegated to
a `StageCompute` (the model, `platform.engine.stages.ModelCompute`; or sleeps of configured length,
`SleepCompute`, for the synthetic-cost benchmark), so the same code path is measured in both.

Per action:
  F c.m        wait for the input (received activations, or a same-rank hand-off at the turn of
               DualPipeV; token ids on the first stage), compute, keep the output for its SEND.
  B c.m        wait for the output gradient (received, hand-off, or the loss on the last stage),
               compute the input gradient only; its W comes later.
  W c.m        weight gradients of an earlier B.
  BW c.m       both at once.
  F c.m&B d.n  the overlapped pair: both inputs are awaited first. Without parallel.overlap the
               forward half is computed and its SEND issued at once, so the activations travel
               while the backward half computes; the backward's SEND follows. With it the two
               halves run as phase programs interleaved phase by phase (`chunk_program.run_pair`), so each
               MoE all-to-all of one travels while the other computes; the forward's SEND is
               issued as soon as its last phase is done.
  SEND / RECV  non-blocking. Receives are posted `recv_lookahead` compute actions ahead of the
               action that needs them; sends are issued when their data exists, never later than
               their place in the list, and in list order.

NCCL's rule. Sends and receives are each posted in list order, and each direction between two
ranks has its own process group (`topology.create_links`), so on every (group, pair) one side posts the list's
sends in order and the other the matching receives in order, which is what NCCL's one-stream,
posting-order matching needs; the schedule validator checks that the two lists agree.

Timing: every compute action, transfer and wait becomes a TimelineRecord (seconds since the step
start, from the step's clock: CUDA events on a GPU). `busy_s` sums compute time, `exposed_comm_s`
the time waiting on transfers and `exposed_a2a_s` on the all-to-alls of phase programs
(parallel.chunk_phases; the one-graph path waits inside autograd, untimed, and its all-to-alls
count as compute).
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from moeforge.platform.engine.p2p import P2P, Transfer
from moeforge.platform.outputs.timeline import TimelineRecord
from moeforge.platform.schedules.actions import Action, Kind, Schedule


class StageCompute(Protocol):
    """What the executor asks a rank's model chunks to do. `x`, `grad_out` and the returned
    tensors are plain (detached) tensors as they cross rank or chunk boundaries; None where a
    pipeline end has none (first stage input: token ids are the compute's own business; last
    stage output: the loss stays inside)."""

    def forward(self, chunk: int, mb: int, x: torch.Tensor | None) -> torch.Tensor | None: ...

    def backward_input(self, chunk: int, mb: int, grad_out: torch.Tensor | None) -> torch.Tensor | None: ...

    def backward_weight(self, chunk: int, mb: int) -> None: ...

    def backward_full(self, chunk: int, mb: int, grad_out: torch.Tensor | None) -> torch.Tensor | None: ...


COMPUTE_RECORD_KINDS = frozenset(k.value for k in Kind if k.is_compute)


@dataclass
class StepTrace:
    """What one step of the executor did on one rank (times in seconds from the step start)."""

    records: list[TimelineRecord] = field(default_factory=list)
    busy_s: float = 0.0  # compute time
    step_s: float = 0.0  # from step start until the last action (and send) finished
    exposed_comm_s: float = 0.0  # time blocked waiting on point-to-point transfers
    exposed_a2a_s: float = 0.0  # time blocked waiting on the phase programs' MoE all-to-alls

    @property
    def bubble_fraction(self) -> float:
        return 1.0 - self.busy_s / self.step_s if self.step_s > 0 else 0.0


def transfer_tag(kind: Kind, chunk: int, mb: int, num_microbatches: int) -> int:
    """One tag per (direction, consumer chunk, micro-batch): distinct between any two ranks in a step."""
    direction = 0 if kind in (Kind.SEND_F, Kind.RECV_F) else 1
    return (direction * 2 + chunk) * num_microbatches + mb


class PipelineExecutor:
    """Executes `schedule.actions[pp_rank]` once per `run()` (one optimizer step's micro-batches).

    `world_rank_of(pp_peer)` maps the schedule's pipeline-rank peers to world ranks (same dp
    replica). `act_shape`/`act_dtype` describe the tensors crossing stages (activations and their
    gradients have the same shape). `fault` (test-only) is called after the first compute action."""

    def __init__(
        self,
        schedule: Schedule,
        pp_rank: int,
        compute: StageCompute,
        p2p: P2P,
        world_rank_of: Callable[[int], int],
        act_shape: tuple[int, ...],
        act_dtype: torch.dtype = torch.float32,
        recv_lookahead: int = 2,
        fault: Callable[[], None] | None = None,
        overlap: bool = False,
    ) -> None:
        if overlap and not hasattr(compute, "overlapped_pair"):
            raise ValueError("parallel.overlap: this compute cannot interleave an F&B pair")
        self.schedule = schedule
        self.overlap = overlap
        self.rank = pp_rank
        self.actions: list[Action] = schedule.actions[pp_rank]
        self.compute = compute
        self.p2p = p2p
        self.world_rank_of = world_rank_of
        self.act_shape = tuple(act_shape)
        self.act_dtype = act_dtype
        self.recv_lookahead = recv_lookahead
        self.fault = fault
        self.clock = p2p.clock

    # ---- one step ---------------------------------------------------------------------------------
    def run(self) -> StepTrace:
        """Run the whole action list once. The timeline starts now (callers run it right after a
        barrier on all ranks, so the ranks' timelines share their origin)."""
        self.p2p.start_step()
        self._records: list[TimelineRecord] = []
        self._recvs: dict[tuple[Kind, int, int], Transfer] = {}
        self._outbox: dict[tuple[str, int, int], torch.Tensor] = {}  # produced data awaiting its SEND
        self._local: dict[tuple[str, int, int], torch.Tensor] = {}  # same-rank hand-offs (DualPipeV turn)
        self._sent: set[int] = set()
        self._recv_cursor = 0
        self._compute_positions = [i for i, a in enumerate(self.actions) if a.kind.is_compute]
        first_compute_done = False
        for i, action in enumerate(self.actions):
            self._post_recvs_ahead(i)
            if action.kind in (Kind.RECV_F, Kind.RECV_B):
                continue  # posted by _post_recvs_ahead (always at or before its own position)
            if action.kind in (Kind.SEND_F, Kind.SEND_B):
                if i not in self._sent:
                    self._send(i)
                continue
            self._run_compute(i, action)
            self.p2p.reap_sends()
            if not first_compute_done:
                first_compute_done = True
                if self.fault is not None:
                    self.fault()
        self.p2p.wait_sends()
        return self._trace(self._records + self.p2p.records)

    def _trace(self, marked: list[TimelineRecord]) -> StepTrace:
        """The step's records in seconds, and the sums made from them (a wait that did not block
        leaves no record)."""
        seconds = self.clock.seconds
        records = [dataclasses.replace(r, start=seconds(r.start), end=seconds(r.end)) for r in marked]
        records = [r for r in records if r.end > r.start or not r.kind.endswith("WAIT")]
        records.sort(key=lambda r: r.start)
        trace = StepTrace(records=records)
        trace.busy_s = sum(r.end - r.start for r in records if r.kind in COMPUTE_RECORD_KINDS)
        trace.exposed_comm_s = sum(r.end - r.start for r in records if r.kind == "WAIT")
        trace.exposed_a2a_s = sum(r.end - r.start for r in records if r.kind == "A2A_WAIT")
        # The step ends with its last recorded action or transfer (not at a clock read after it: a
        # process descheduled there on shared cores would add time in which nothing ran).
        trace.step_s = max((r.end for r in records), default=0.0)
        return trace

    # ---- compute ----------------------------------------------------------------------------------
    def _run_compute(self, index: int, a: Action) -> None:
        if a.kind is Kind.FB and self.overlap:
            x = self._forward_input(a.chunk, a.mb)
            grad_out = self._backward_input(a.b_chunk, a.b_mb)
            start = self._now()

            def forward_done(out: torch.Tensor | None) -> None:
                self._deliver_forward(a.chunk, a.mb, out)
                self._issue_ready_sends(index)  # the activations travel while the backward ends

            def phase_done(half: str, begin: object, end: object) -> None:  # the pair's phases, on the timeline
                label = f"{a.chunk}.{a.mb}" if half == "F" else f"{a.b_chunk}.{a.b_mb}"
                self._records.append(
                    TimelineRecord(self.p2p.timeline_rank, f"{half}{label}", f"PHASE_{half}", begin, end)
                )

            grad_in = self.compute.overlapped_pair(
                (a.chunk, a.mb, x),
                (a.b_chunk, a.b_mb, grad_out),
                a.b_kind is Kind.BW,
                forward_done,
                phase_done,
                self.clock.now,
            )
            self._deliver_backward(a.b_chunk, a.b_mb, grad_in)
        elif a.kind is Kind.FB:
            x = self._forward_input(a.chunk, a.mb)
            grad_out = self._backward_input(a.b_chunk, a.b_mb)
            start = self._now()
            self._forward(a.chunk, a.mb, x)
            self._issue_ready_sends(index)  # the forward's activations travel during the backward half
            self._backward(a.b_chunk, a.b_mb, grad_out, full=a.b_kind is Kind.BW)
        elif a.kind is Kind.F:
            x = self._forward_input(a.chunk, a.mb)
            start = self._now()
            self._forward(a.chunk, a.mb, x)
        elif a.kind in (Kind.B, Kind.BW):
            grad_out = self._backward_input(a.chunk, a.mb)
            start = self._now()
            self._backward(a.chunk, a.mb, grad_out, full=a.kind is Kind.BW)
        elif a.kind is Kind.W:
            start = self._now()
            self.compute.backward_weight(a.chunk, a.mb)
        else:  # pragma: no cover - Kind is closed
            raise ValueError(f"unknown action {a}")
        end = self._now()
        self._records.append(TimelineRecord(self.p2p.timeline_rank, str(a), a.kind.value, start, end))
        self._issue_ready_sends(index)

    def _forward_input(self, chunk: int, mb: int) -> torch.Tensor | None:
        prev = self.schedule.prev_rank(self.rank, chunk)
        if prev is None:
            return None
        if prev == self.rank:
            return self._local.pop(("F", chunk, mb))
        return self.p2p.wait(self._recvs.pop((Kind.RECV_F, chunk, mb)))

    def _backward_input(self, chunk: int, mb: int) -> torch.Tensor | None:
        nxt = self.schedule.next_rank(self.rank, chunk)
        if nxt is None:
            return None
        if nxt == self.rank:
            return self._local.pop(("B", chunk, mb))
        return self.p2p.wait(self._recvs.pop((Kind.RECV_B, chunk, mb)))

    def _forward(self, chunk: int, mb: int, x: torch.Tensor | None) -> None:
        self._deliver_forward(chunk, mb, self.compute.forward(chunk, mb, x))

    def _deliver_forward(self, chunk: int, mb: int, out: torch.Tensor | None) -> None:
        """A forward's output to its SEND, or to the other local chunk at the turn of the V."""
        nxt = self.schedule.next_rank(self.rank, chunk)
        if nxt is None:
            return
        if nxt == self.rank:  # the turn of the V: hand the activations to the other local chunk
            self._local[("F", self.schedule.neighbour_chunk(self.rank, chunk, +1), mb)] = out
        else:
            self._outbox[("F", chunk, mb)] = out

    def _backward(self, chunk: int, mb: int, grad_out: torch.Tensor | None, full: bool) -> None:
        if full:
            grad_in = self.compute.backward_full(chunk, mb, grad_out)
        else:
            grad_in = self.compute.backward_input(chunk, mb, grad_out)
        self._deliver_backward(chunk, mb, grad_in)

    def _deliver_backward(self, chunk: int, mb: int, grad_in: torch.Tensor | None) -> None:
        """A backward's input gradient to its SEND, or to the other local chunk."""
        prev = self.schedule.prev_rank(self.rank, chunk)
        if prev is None:
            return
        if prev == self.rank:
            self._local[("B", self.schedule.neighbour_chunk(self.rank, chunk, -1), mb)] = grad_in
        else:
            self._outbox[("B", chunk, mb)] = grad_in

    # ---- communication ----------------------------------------------------------------------------
    def _now(self) -> object:
        return self.clock.now()

    def _post_recvs_ahead(self, index: int) -> None:
        """Post every RECV up to the `recv_lookahead`-th compute action after `index`, in list order."""
        nth = bisect.bisect_left(self._compute_positions, index) + self.recv_lookahead
        limit = self._compute_positions[nth] if nth < len(self._compute_positions) else len(self.actions)
        while self._recv_cursor < limit:
            a = self.actions[self._recv_cursor]
            if a.kind in (Kind.RECV_F, Kind.RECV_B):
                tag = transfer_tag(a.kind, a.chunk, a.mb, self.schedule.num_microbatches)
                self._recvs[(a.kind, a.chunk, a.mb)] = self.p2p.irecv(
                    self.act_shape, self.act_dtype, self.world_rank_of(a.peer), tag, str(a)
                )
            self._recv_cursor += 1

    def _send(self, index: int) -> None:
        a = self.actions[index]
        producer_chunk = self.schedule.producer_chunk(a, self.rank)
        key = ("F" if a.kind is Kind.SEND_F else "B", producer_chunk, a.mb)
        if key not in self._outbox:
            raise RuntimeError(f"pipeline rank {self.rank}: {a} comes before its data was produced")
        tag = transfer_tag(a.kind, a.chunk, a.mb, self.schedule.num_microbatches)
        self.p2p.isend(self._outbox.pop(key), self.world_rank_of(a.peer), tag, str(a))
        self._sent.add(index)

    def _issue_ready_sends(self, index: int) -> None:
        """Issue the SENDs that follow action `index` in the list (up to the next compute action)
        whose data exists, in list order, stopping at the first one still waiting for its data."""
        j = index + 1
        while j < len(self.actions) and self.actions[j].kind.is_comm:
            a = self.actions[j]
            if a.kind in (Kind.SEND_F, Kind.SEND_B) and j not in self._sent:
                key = (
                    "F" if a.kind is Kind.SEND_F else "B",
                    self.schedule.producer_chunk(a, self.rank),
                    a.mb,
                )
                if key not in self._outbox:
                    return
                self._send(j)
            j += 1


class SleepCompute:
    """Synthetic-cost compute for the benchmark: each action sleeps its configured time and passes
    a small tensor along, so the executor's ordering and communication run for real."""

    def __init__(self, f_s: float, b_s: float, w_s: float, act_shape: tuple[int, ...]) -> None:
        self.f_s, self.b_s, self.w_s = f_s, b_s, w_s  # b_s: full backward (input + weight)
        self.act_shape = act_shape

    def forward(self, chunk, mb, x):
        time.sleep(self.f_s)
        return torch.zeros(self.act_shape)

    def backward_input(self, chunk, mb, grad_out):
        time.sleep(self.b_s - self.w_s)
        return torch.zeros(self.act_shape)

    def backward_weight(self, chunk, mb):
        time.sleep(self.w_s)

    def backward_full(self, chunk, mb, grad_out):
        time.sleep(self.b_s)
        return torch.zeros(self.act_shape)
