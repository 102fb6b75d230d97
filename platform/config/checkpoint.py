"""Checkpointing: safetensors plus JSON manifests under run.dir."""

from __future__ import annotations

from dataclasses import dataclass

from moeforge.platform.config._build import require


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0 disables
    keep: int = 2
    resume: bool = True

    def __post_init__(self) -> None:
        require(self.every >= 0, "every", "must be >= 0 (0 disables)")
        require(self.keep >= 1, "keep", "must be >= 1")
