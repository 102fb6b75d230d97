"""What a training loop does with a bad step: one policy, asked by the reference loop and by every
pipeline rank alike (each rank sees the same all-reduced loss and norm, so all decide the same).

Non-finite steps. A NaN or Inf loss or gradient norm skips the optimizer step: weights, AdamW
moments and router biases stay as the last good step left them, the step's batch is consumed (the
step count moves on, so the data position and the LR schedule stay the run's), and the step is
recorded with `skipped: true`. `run.max_nonfinite_steps` such steps in a row end the run with a
`BadStepError` naming the steps; a finite step resets the count.

Loss spikes (`run.spike_policy=rollback`). Once `run.spike_window` finite losses are known, a loss
above `run.spike_factor` times their running median is a spike: the loop reloads the newest complete
checkpoint and skips the data window from it to the spike (the batches of steps c+1..s are never
trained on; the steps are recomputed on the batches after them), as PaLM and OPT restarted past
their spikes. `run.max_rollbacks` bounds how often a run may do so.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


class BadStepError(FloatingPointError):
    """A run ended by its bad-step policy; the message names the steps."""


@dataclass(frozen=True)
class Rollback:
    """A loss spike at `step` rolled the run back to the checkpoint of `to_step`; the batches of
    steps to_step+1..step were skipped."""

    step: int
    loss: float
    median: float
    to_step: int

    def to_dict(self) -> dict:
        return {"step": self.step, "loss": self.loss, "median": self.median, "to_step": self.to_step}


def is_finite_step(loss: float, grad_norm: float) -> bool:
    return math.isfinite(loss) and math.isfinite(grad_norm)


class BadStepPolicy:
    """Counts non-finite steps and spots loss spikes for one run (see the module docstring)."""

    def __init__(self, run_cfg) -> None:
        self.cfg = run_cfg
        self.recent: deque[float] = deque(maxlen=run_cfg.spike_window)
        self.streak_start: int | None = None  # first step of the current run of non-finite steps
        self.skipped_steps = 0
        self.rollbacks: list[Rollback] = []

    def after_step(self, step: int, loss: float, skipped: bool) -> None:
        """Account for step `step`; raise BadStepError when it completes run.max_nonfinite_steps
        non-finite steps in a row."""
        if not skipped:
            self.streak_start = None
            return
        self.skipped_steps += 1
        if self.streak_start is None:
            self.streak_start = step
        streak = step - self.streak_start + 1
        if streak >= self.cfg.max_nonfinite_steps:
            steps = f"step {step}" if streak == 1 else f"steps {self.streak_start}-{step}"
            raise BadStepError(
                f"loss or gradient norm non-finite at {steps} (loss {loss} at step {step}): "
                f"{streak} in a row reached run.max_nonfinite_steps={self.cfg.max_nonfinite_steps}"
            )

    def is_spike(self, loss: float) -> tuple[bool, float]:
        """Whether a finite `loss` is a spike under run.spike_policy, and the median it was judged
        by; a loss that is not a spike joins the window."""
        if not math.isfinite(loss):
            return False, math.nan
        if self.cfg.spike_policy == "rollback" and len(self.recent) == self.recent.maxlen:
            median = statistics.median(self.recent)
            if loss > self.cfg.spike_factor * median:
                return True, median
        self.recent.append(loss)
        return False, math.nan

    def roll_back(
        self,
        step: int,
        loss: float,
        median: float,
        restore_newest: Callable[[int], int | None],
        log: Callable[[str], None],
    ) -> Rollback | None:
        """The one rollback flow of both loops, after a spike at `step` judged by `median`.

        `restore_newest(step)` is the loop's own part: wait for any checkpoint in flight, reload the
        newest complete one and skip the batches from it to the spike; it returns that checkpoint's
        step, or None (changing nothing) when there is none. Returns the Rollback, recorded (and
        BadStepError past run.max_rollbacks, raised after the reload so that a failure checkpoint
        can never hold the spiked state), or None with a log line when there was nothing to go
        back to."""
        to_step = restore_newest(step)
        if to_step is None:
            log(
                f"loss spike at step {step} ({loss:.4f} > {self.cfg.spike_factor} x median "
                f"{median:.4f}), but no checkpoint to roll back to: training on"
            )
            return None
        rollback = Rollback(step=step, loss=loss, median=median, to_step=to_step)
        self.rolled_back(rollback)
        return rollback

    def rolled_back(self, rollback: Rollback) -> None:
        """Record a rollback; raise BadStepError past run.max_rollbacks."""
        self.rollbacks.append(rollback)
        if len(self.rollbacks) > self.cfg.max_rollbacks:
            raise BadStepError(
                f"loss spike at step {rollback.step} (loss {rollback.loss:.4g} > "
                f"{self.cfg.spike_factor} x median {rollback.median:.4g}): "
                f"{len(self.rollbacks)} rollbacks exceed run.max_rollbacks={self.cfg.max_rollbacks}"
            )
