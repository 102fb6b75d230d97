"""Training data: token shards, the deterministic sampler, and the batch source the training loop uses."""

from moeforge.platform.data.batches import BatchSource

__all__ = ["BatchSource"]
