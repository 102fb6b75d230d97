"""Checkpointing: safetensors plus JSON manifests under run.dir, and recovery from a lost worker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from moeforge.platform.config.builder import require


@dataclass
class CheckpointConfig:
    """`every` steps between checkpoints (0 disables); the newest `keep` complete ones are kept;
    `resume` continues from the newest complete checkpoint in run.dir.

    `async_save` (YAML key `async`): snapshot the state to host memory at the step and write/upload
    it on a background thread while training goes on; at most one checkpoint is in flight.
    `async_failure`: what a failed background write does to the run: "fail" ends it at the next
    step, "continue" reports it and trains on (the previous complete checkpoint stays the latest).

    `max_failures`: how many times a pipeline run restarts its worker group after a worker dies
    (Ray Train's FailureConfig); each restart resumes from the newest complete checkpoint."""

    KEY_ALIASES: ClassVar[dict[str, str]] = {"async": "async_save"}

    every: int = 0
    keep: int = 2
    resume: bool = True
    async_save: bool = False
    async_failure: Literal["fail", "continue"] = "fail"
    max_failures: int = 0

    def __post_init__(self) -> None:
        require(self.every >= 0, "every", "must be >= 0 (0 disables)")
        require(self.keep >= 1, "keep", "must be >= 1")
        require(self.max_failures >= 0, "max_failures", f"must be >= 0, got {self.max_failures}")
        require(
            self.max_failures == 0 or self.every > 0,
            "max_failures",
            "a restart resumes from the newest checkpoint: set checkpoint.every > 0 too",
        )
