"""Where training tokens come from."""

from __future__ import annotations

from dataclasses import dataclass

from moeforge.platform.config.builder import require

SOURCES = ("synthetic", "tokens")


@dataclass
class DataConfig:
    """`synthetic`: seeded learnable tokens from a sparse Markov chain (smoke runs); `tokens`: a
    prepared token-shard directory (moeforge-prepare) or a single memory-mapped uint16/uint32 token
    file at `path` (local, or s3:// cached locally). A directory of packed conversations
    (moeforge-prepare format=conversations) gives batches with loss masks and segments, and must
    have been packed for the model's seq_len."""

    source: str = "synthetic"
    path: str | None = None
    global_batch: int = 8  # sequences per optimizer step, summed over micro-batches and dp ranks
    seed: int = 1234
    val_fraction: float = 0.0  # tokens: held-out tail of the samples when the data has no val split
    verify: str = "sha256"  # tokens: check prepared shards by sha256 (or only by size) before use
    cache_dir: str | None = None  # tokens on s3://: local copy (default ~/.cache/moeforge/tokens)
    endpoint_url: str | None = None  # tokens on s3://: S3-compatible endpoint override

    def __post_init__(self) -> None:
        require(self.source in SOURCES, "source", f"must be one of {SOURCES}, got {self.source!r}")
        if self.source == "tokens":
            require(bool(self.path), "path", "is required when source=tokens")
        require(self.global_batch >= 1, "global_batch", f"must be >= 1, got {self.global_batch}")
        require(0.0 <= self.val_fraction < 1.0, "val_fraction", "must lie in [0, 1)")
        require(self.verify in ("sha256", "size"), "verify", f"must be sha256 or size, got {self.verify!r}")
