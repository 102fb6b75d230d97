"""Test-only settings. Production classes never read this section: the Trainer's factories turn it
into hooks (`moeforge.platform.train.faults.FaultInjection`) that the step engines call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moeforge.platform.config.builder import require

PROCESS_FAULTS = ("raise", "hang", "sigkill", "sigterm")
DATA_FAULTS = ("nan_grad", "loss_spike")


@dataclass
class DebugConfig:
    # Make one rank fail mid-step, {"rank": 1, "step": 1, "kind": "raise" | "hang" | "sigkill" | "sigterm"},
    # or one global batch go bad, {"batch": 3, "kind": "nan_grad" | "loss_spike"}.
    fault_injection: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.fault_injection is None:
            return
        fault = dict(self.fault_injection)
        process_fault = set(fault) == {"rank", "step", "kind"} and fault["kind"] in PROCESS_FAULTS
        data_fault = set(fault) == {"batch", "kind"} and fault["kind"] in DATA_FAULTS
        require(
            process_fault or data_fault,
            "fault_injection",
            "test-only hook: {rank, step, kind: raise|hang|sigkill|sigterm} or {batch, kind: nan_grad|loss_spike}, "
            f"got {fault}",
        )
        self.fault_injection = fault
