"""The data contract both training loops share: a step's batch, its micro-batches, inputs and labels.

The reference loop and the pipeline runtime split a step's global batch the same way
(`split_microbatches`: equal row blocks, in order) and shift tokens into inputs and labels the same
way, so micro-batch i of a pipeline step holds exactly the reference's rows: the two can be compared
loss for loss.
"""

from __future__ import annotations

from typing import Protocol

import torch
from moeforge.platform.config.train import TrainConfig


class BatchSourceLike(Protocol):
    """What the loop needs from its data (platform.data.BatchSource, or a test's own source)."""

    has_val: bool  # whether val_batch can be called (evaluation is skipped otherwise)

    def batch(self, step: int) -> torch.Tensor:
        """Token windows for optimizer step `step`: LongTensor [global_batch, seq_len + 1]."""

    def val_batch(self, i: int) -> torch.Tensor:
        """The i-th held-out batch, same shape."""


def split_microbatches(batch: torch.Tensor, microbatches: int) -> list[torch.Tensor]:
    """Split [global_batch, seq_len + 1] into `microbatches` equal row blocks, in order.

    The pipeline runtime feeds micro-batch i of the same step with exactly these rows."""
    rows = batch.shape[0]
    if rows % microbatches:
        raise ValueError(f"batch of {rows} sequences does not split into {microbatches} micro-batches")
    return list(batch.split(rows // microbatches, dim=0))


def inputs_and_labels(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of seq_len + 1 tokens -> (input_ids, labels), each [b, seq_len], labels shifted by one."""
    return tokens[:, :-1], tokens[:, 1:]


def default_batch_source(cfg: TrainConfig) -> BatchSourceLike:
    """The data engineer's BatchSource for this config (imported late: the data stack is optional
    for callers that inject their own source)."""
    from moeforge.platform.data.batches import BatchSource

    return BatchSource(cfg.data, cfg.model.vocab_size, cfg.model.seq_len)
