"""Where training tokens come from."""

from __future__ import annotations

from dataclasses import dataclass

from moeforge.platform.config._build import require

SOURCES = ("synthetic", "tokens")


@dataclass
class DataConfig:
    """`synthetic`: seeded random tokens (smoke runs); `tokens`: a prepared token-shard directory or a
    single memory-mapped token file at `path` (local, or s3:// cached locally)."""

    source: str = "synthetic"
    path: str | None = None
    global_batch: int = 8  # sequences per optimizer step, summed over micro-batches and dp ranks
    seed: int = 1234
    val_fraction: float = 0.0

    def __post_init__(self) -> None:
        require(self.source in SOURCES, "source", f"must be one of {SOURCES}, got {self.source!r}")
        if self.source == "tokens":
            require(bool(self.path), "path", "is required when source=tokens")
        require(self.global_batch >= 1, "global_batch", f"must be >= 1, got {self.global_batch}")
        require(0.0 <= self.val_fraction < 1.0, "val_fraction", "must lie in [0, 1)")
