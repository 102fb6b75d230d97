"""The clock of one pipeline step's timeline: host time on CPU, CUDA events on a GPU.

The executor marks when each action, phase, transfer and wait starts and ends. On the CPU the work
runs when the host calls it, so a host clock reading is the truth. On a GPU the host only launches
work and runs ahead of the device (it must, for transfers to overlap compute), so a host reading
times the launch, not the work. There a mark is a CUDA event recorded on the current stream, read
once the step is over (`seconds` waits for the step's last event, at the step's end, where the
metrics need host values anyway). A wait's two marks then bracket the stream's stall on the
transfer: the exposed communication.

    clock.start()      anchors the step (after the barrier every rank passes)
    mark = clock.now() a host float (seconds since start) or a recorded event
    clock.seconds(mark) -> float seconds since start (after the step's work, for events)
"""

from __future__ import annotations

import time
from typing import Protocol

import torch


class StepClock(Protocol):
    def start(self) -> None: ...

    def now(self) -> object: ...

    def seconds(self, mark: object) -> float: ...


class HostClock:
    """time.perf_counter since `start()`; marks are already seconds."""

    def __init__(self, clock=time.perf_counter) -> None:
        self.clock = clock
        self.t0 = clock()

    def start(self) -> None:
        self.t0 = self.clock()

    def now(self) -> float:
        return self.clock() - self.t0

    def seconds(self, mark: float) -> float:
        return mark


class CudaEventClock:
    """CUDA events on the current stream of `device`; marks are resolved after the device reached
    them (one wait per step, on the newest event)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.t0: torch.cuda.Event | None = None
        self.last: torch.cuda.Event | None = None

    def _record(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        self.last = event
        return event

    def start(self) -> None:
        self.t0 = self._record()

    def now(self) -> torch.cuda.Event:
        return self._record()

    def seconds(self, mark: torch.cuda.Event) -> float:
        if self.last is not None:
            self.last.synchronize()  # the step's end: every earlier mark has been reached too
            self.last = None
        return self.t0.elapsed_time(mark) / 1e3


def clock_for(device: torch.device | str) -> StepClock:
    """CUDA events for a CUDA device, the host clock otherwise."""
    return CudaEventClock(device) if torch.device(device).type == "cuda" else HostClock()
