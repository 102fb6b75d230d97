"""Experiment tracking."""

from __future__ import annotations

from dataclasses import dataclass

from moeforge.platform.config.builder import require


@dataclass
class TrackingConfig:
    """`wandb` logs from global rank 0 only; mode defaults to offline when no API key is set."""

    backend: str = "none"  # wandb | none
    project: str = "moeforge"
    mode: str | None = None  # online | offline | disabled; None: WANDB_MODE or offline without a key
    log_timeline: bool = True

    def __post_init__(self) -> None:
        require(self.backend in ("wandb", "none"), "backend", f"must be wandb|none, got {self.backend!r}")
        if self.mode is not None:
            modes = ("online", "offline", "disabled")
            require(self.mode in modes, "mode", f"must be one of {modes}, got {self.mode!r}")
