"""Synthetic stage chunks for moeforge-bench overlap: compute phases that sleep, all-to-alls that are real.

A chunk of `layers` MoE layers runs, per layer, an attention phase, the dispatch all-to-all, an
experts phase and the combine all-to-all, then a short tail phase (the last residual, the head):

    forward    attn | dispatch | experts | combine | attn | ... | tail
    backward   the same phases in reverse, each `backward_factor` times as long; of that time the
               `w_fraction` share is the weight gradient (W), deferred unless the action is BW

Each all-to-all moves `a2a_numel` float32 values per rank over the stage's EP group through gloo
(`launch_all_to_all`, the call PhasedMoE makes), is launched at the end of its phase and waited on
at the start of the next one of its own program, exactly where a phase program consumes its
result. So `SleepPhaseCompute` drives the executor's F, B, W and overlapped F&B actions through the
same interleaving (`chunk_program.run_pair`) as the model, with costs that are known.

`PhaseShape.programs()` gives the same phases as the schedule simulator's phase costs
(`platform.schedules.phase_costs.ProgramCosts`), so a measured step can be set beside its prediction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from moeforge.platform.engine.chunk_program import Program, run_pair, run_to_end
from moeforge.platform.moe.dispatch import CollectiveTracker, launch_all_to_all
from moeforge.platform.schedules.phase_costs import ProgramCosts


@dataclass(frozen=True)
class PhaseShape:
    """One chunk's phases (seconds) and the all-to-all payload."""

    layers: int
    attn_s: float
    experts_s: float
    tail_s: float
    backward_factor: float
    w_fraction: float
    a2a_numel: int  # float32 values each rank sends per all-to-all, split evenly over the EP group

    def forward_phases(self) -> list[float]:
        return [self.attn_s, self.experts_s] * self.layers + [self.tail_s]

    def backward_phases(self) -> list[float]:
        """Input-gradient part of each backward phase, in backward order."""
        scale = self.backward_factor * (1.0 - self.w_fraction)
        return [scale * s for s in reversed(self.forward_phases())]

    def payload(self, ep_size: int) -> tuple[torch.Tensor, list[int]]:
        """The all-to-all's send buffer and its equal splits over `ep_size` ranks."""
        per_peer = max(1, self.a2a_numel // ep_size)
        return torch.zeros(per_peer * ep_size), [per_peer] * ep_size

    @property
    def w_s(self) -> float:
        return self.backward_factor * self.w_fraction * sum(self.forward_phases())

    def programs(self, a2a_s: float) -> tuple[ProgramCosts, ProgramCosts]:
        """The forward and full backward (W on the last phase) as the simulator's phase costs, each
        all-to-all taking `a2a_s`."""
        transfers = (a2a_s,) * (2 * self.layers)
        backward = self.backward_phases()
        backward[-1] += self.w_s
        return ProgramCosts(tuple(self.forward_phases()), transfers), ProgramCosts(tuple(backward), transfers)


@dataclass
class SleepPhaseCompute:
    """StageCompute (with `overlapped_pair`) whose phases sleep and whose all-to-alls are real."""

    shape: PhaseShape
    ep_group: object
    ep_size: int
    act_shape: tuple[int, ...]
    tracker: CollectiveTracker | None = None  # the rank's P2P endpoint: times every wait
    order: str = "backward_first"  # parallel.overlap_order

    def __post_init__(self) -> None:
        self.payload, self.splits = self.shape.payload(self.ep_size)

    # ---- programs ---------------------------------------------------------------------------------
    def _program(self, phases: list[float], label: str, extra_last_s: float = 0.0) -> Program:
        for k, seconds in enumerate(phases):
            last = k == len(phases) - 1
            time.sleep(seconds + (extra_last_s if last else 0.0))
            if last:
                return None
            what = "dispatch" if k % 2 == 0 else "combine"
            handle = launch_all_to_all(
                self.payload, self.splits, self.splits, self.ep_group, self.tracker, f"{label} {what}"
            )
            yield  # the all-to-all travels while the other program of a pair computes
            handle.wait()
        return None

    def forward_program(self, chunk: int, mb: int, x) -> Program:
        yield from self._program(self.shape.forward_phases(), f"F{chunk}.{mb}")
        return torch.zeros(self.act_shape)

    def backward_program(self, chunk: int, mb: int, grad_out, full: bool) -> Program:
        extra = self.shape.w_s if full else 0.0
        yield from self._program(self.shape.backward_phases(), f"B{chunk}.{mb}", extra)
        return torch.zeros(self.act_shape)

    # ---- StageCompute -----------------------------------------------------------------------------
    def forward(self, chunk, mb, x):
        return run_to_end(self.forward_program(chunk, mb, x))

    def backward_input(self, chunk, mb, grad_out):
        return run_to_end(self.backward_program(chunk, mb, grad_out, full=False))

    def backward_full(self, chunk, mb, grad_out):
        return run_to_end(self.backward_program(chunk, mb, grad_out, full=True))

    def backward_weight(self, chunk, mb):
        time.sleep(self.shape.w_s)

    def overlapped_pair(self, f, b, full, on_forward_done, on_phase=None, now=time.perf_counter):
        programs = self.forward_program(*f), self.backward_program(*b, full)
        _, grad_in = run_pair(*programs, on_forward_done, self.order, on_phase, now)
        return grad_in
