"""Where a run writes its outputs and how it is named."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moeforge.platform.config.builder import require


@dataclass
class RunConfig:
    """`dir` is local or `s3://bucket/prefix`; never Hydra's working directory (under
    `ray job submit` that is a temporary package directory on the head node)."""

    name: str = "moeforge"
    dir: str = "runs/default"
    seed: int = 1234
    steps: int = 200
    log_every: int = 10
    eval_every: int = 50  # steps between evaluations (and one at the end); 0 disables
    eval_batches: int = 2  # global batches per evaluation
    # bad steps (`platform.optim.bad_steps.BadStepPolicy`): a NaN/Inf loss or grad norm skips the update; this
    # many in a row end the run
    max_nonfinite_steps: int = 3
    # "rollback": a loss above spike_factor x the median of the last spike_window losses reloads the
    # newest checkpoint and skips the data window up to the spike (at most max_rollbacks times)
    spike_policy: Literal["none", "rollback"] = "none"
    spike_factor: float = 3.0
    spike_window: int = 32
    max_rollbacks: int = 3

    def __post_init__(self) -> None:
        require(bool(self.dir), "dir", "must be a non-empty path")
        require(self.steps > 0, "steps", f"must be positive, got {self.steps}")
        require(self.log_every > 0, "log_every", f"must be positive, got {self.log_every}")
        require(self.eval_every >= 0, "eval_every", f"must be >= 0 (0 disables), got {self.eval_every}")
        require(self.eval_batches >= 1, "eval_batches", f"must be >= 1, got {self.eval_batches}")
        require(
            self.max_nonfinite_steps >= 1,
            "max_nonfinite_steps",
            f"must be >= 1, got {self.max_nonfinite_steps}",
        )
        require(self.spike_factor > 1.0, "spike_factor", f"must be > 1, got {self.spike_factor}")
        require(self.spike_window >= 1, "spike_window", f"must be >= 1, got {self.spike_window}")
        require(self.max_rollbacks >= 0, "max_rollbacks", f"must be >= 0, got {self.max_rollbacks}")
