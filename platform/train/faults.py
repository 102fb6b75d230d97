"""Test-only faults (`debug.fault_injection`), as hooks the step engines call.

The engines never read the `debug` section: the Trainer's factories build a `FaultInjection` from
it and hand it over. A process fault fires on one rank at one step, after the step's first compute
action; a data fault makes one global batch (by data index, so a rollback that skips the batch
never meets it again) give NaN gradients or a loss spike.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from moeforge.platform.config.debug import DATA_FAULTS

LOSS_SPIKE_FACTOR = 10.0  # what an injected loss spike multiplies the step's losses by


class InjectedFault(RuntimeError):
    """Raised by the test-only debug.fault_injection hook."""


@dataclass(frozen=True)
class FaultInjection:
    fault: dict[str, Any]
    run_dir: str

    @classmethod
    def from_config(cls, cfg) -> FaultInjection | None:
        """The hooks of a TrainConfig's `debug.fault_injection`, or None without one."""
        fault = cfg.debug.fault_injection
        return cls(dict(fault), cfg.run.dir) if fault else None

    def data_fault(self, batch_index: int) -> str | None:
        """"nan_grad" or "loss_spike" for the batch at data index `batch_index`, else None."""
        if self.fault["kind"] in DATA_FAULTS and self.fault["batch"] == batch_index:
            return self.fault["kind"]
        return None

    def at_step(self, rank: int, step: int, name: str) -> None:
        """Fire the process fault if it is this rank's at this step."""
        if self.fault.get("rank") != rank or self.fault.get("step") != step:
            return
        kind = self.fault["kind"]
        if kind == "sigkill":
            # The process dies as a lost node's would: no exception, no cleanup. Once per run.dir
            # (a marker written first), so the restarted worker group trains through this step.
            from moeforge.platform.outputs.storage import open_storage

            storage = open_storage(self.run_dir)
            marker = f"fault_injection.rank{rank}.step{step}"
            if storage.exists(marker):
                return
            storage.write_text(marker, "fired\n")
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "sigterm":  # a scheduler's stop, mid-step: the Trainer stops every rank after it
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if kind == "raise":
            raise InjectedFault(f"{name}: injected fault at step {step} (debug.fault_injection)")
        while True:  # "hang": never send again; the peers' p2p timeout must end the run
            time.sleep(1.0)
