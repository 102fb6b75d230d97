"""When a training run logs, evaluates and checkpoints: one rule for every loop.

The reference loop, the pipeline run and the console progress line all ask a `Cadence` instead of
restating `step % every == 0 or step == last`, so the steps a pipeline run evaluates or checkpoints
are exactly the reference's (the pipeline tests compare them step for step).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cadence:
    """Steps are 1-based counts of optimizer steps taken. An `every` of 0 disables that event
    (log_every must be positive); every enabled event also happens at the last step."""

    steps: int
    log_every: int = 1
    eval_every: int = 0
    checkpoint_every: int = 0

    @classmethod
    def of(cls, cfg) -> Cadence:
        """The cadence of a TrainConfig (run.steps / log_every / eval_every, checkpoint.every)."""
        run = cfg.run
        return cls(run.steps, run.log_every, run.eval_every, cfg.checkpoint.every)

    def is_last(self, step: int) -> bool:
        return step == self.steps

    def _due(self, step: int, every: int) -> bool:
        return bool(every) and (step % every == 0 or self.is_last(step))

    def logs(self, step: int) -> bool:
        """A progress line (and a metrics flush, and Ray Train's report) after this step."""
        return self._due(step, self.log_every)

    def evaluates(self, step: int) -> bool:
        return self._due(step, self.eval_every)

    def checkpoints(self, step: int) -> bool:
        return self._due(step, self.checkpoint_every)
