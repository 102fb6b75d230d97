"""Where a run writes its outputs and how it is named."""

from __future__ import annotations

from dataclasses import dataclass

from moeforge.platform.config._build import require


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

    def __post_init__(self) -> None:
        require(bool(self.dir), "dir", "must be a non-empty path")
        require(self.steps > 0, "steps", f"must be positive, got {self.steps}")
        require(self.log_every > 0, "log_every", f"must be positive, got {self.log_every}")
        require(self.eval_every >= 0, "eval_every", f"must be >= 0 (0 disables), got {self.eval_every}")
        require(self.eval_batches >= 1, "eval_batches", f"must be >= 1, got {self.eval_batches}")
