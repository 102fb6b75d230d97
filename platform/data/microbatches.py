"""The data contract both training loops share: a step's batch, its micro-batches, inputs and labels,
and each micro-batch's weight in the step's loss.

The reference loop and the pipeline runtime split a step's global batch the same way
(`split_microbatches`: equal row blocks, in order) and shift tokens into inputs and labels the same
way (`model_inputs`), so micro-batch i of a pipeline step holds exactly the reference's rows: the two
can be compared loss for loss.

A batch is plain text (a LongTensor [rows, seq_len + 1]: every label trains, one document per row)
or a `PackedBatch` (conversations packed into rows: labels masked, segments per token). Either way
the step's objective is the mean over every trained label of the whole global batch: micro-batch m
(whose loss is the mean over its own n_m trained labels) is weighted by n_m / N, N the global
batch's count (`microbatch_inputs`), and each MTP depth alike by its own targets' share. For plain
text every n_m is equal and the weight is 1/M.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from moeforge.model.transformer import IGNORE_INDEX, mtp_targets
from moeforge.platform.config.train import TrainConfig


@dataclass(frozen=True)
class PackedBatch:
    """Rows of packed conversations, each row seq_len + 1 tokens long (inputs [:-1], targets [1:]).

    Several documents share a row; attention must not cross them and positions restart at each.
    `loss_mask[r, t]` says whether token t of row r is trained as a target (assistant tokens);
    `segments[r, t]` is the index of token t's document within its row (0, 1, ...; the padding
    after the last document is a segment of its own, never trained)."""

    tokens: torch.Tensor  # [rows, seq_len + 1] int64
    loss_mask: torch.Tensor  # [rows, seq_len + 1] bool
    segments: torch.Tensor  # [rows, seq_len + 1] int64


Batch = torch.Tensor | PackedBatch  # what a source returns for a step: plain text rows or packed rows


class BatchSourceLike(Protocol):
    """What the loop needs from its data (platform.data.BatchSource, or a test's own source)."""

    has_val: bool  # whether val_batch can be called (evaluation is skipped otherwise)

    def batch(self, step: int, dp_rank: int = 0, dp_size: int = 1) -> Batch:
        """Rows for optimizer step `step`: LongTensor [global_batch // dp_size, seq_len + 1] or a
        PackedBatch of that shape; dp replica `dp_rank`'s contiguous share of the global batch."""

    def val_batch(self, i: int, dp_rank: int = 0, dp_size: int = 1) -> Batch:
        """The i-th held-out batch, same shape."""


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch as the model takes it. Both step engines build these (`microbatch_inputs`)."""

    input_ids: torch.Tensor  # [b, s]
    labels: torch.Tensor  # [b, s]; IGNORE_INDEX where no target is trained
    segments: torch.Tensor | None = None  # [b, s] packed rows' segment ids; None: one document per row
    label_count: int | None = None  # trained labels (labels != IGNORE_INDEX), counted on the host
    # The factor on this micro-batch's loss before its backward: replicas * n_m / N (`loss_scale`).
    # None: the engine's uniform 1/M.
    loss_scale: float | None = None
    # Per MTP depth k, the factor on that depth's mean loss inside the micro-batch's loss (the
    # model's `mtp_scales`): (n_m^k / N^k) / (n_m / N), so that with `loss_scale` the depth's term
    # is weighted by its own share of the step's depth-k targets. None: every factor is 1 (plain
    # text, where each share is 1/M).
    mtp_scales: tuple[float, ...] | None = None

    def to(self, device: torch.device | str) -> MicroBatch:
        """The same micro-batch with its tensors on `device`."""
        segments = None if self.segments is None else self.segments.to(device)
        ids, labels = self.input_ids.to(device), self.labels.to(device)
        return replace(self, input_ids=ids, labels=labels, segments=segments)


def batch_tokens(batch: Batch) -> torch.Tensor:
    """The token rows [rows, seq_len + 1] of either kind of batch."""
    return batch.tokens if isinstance(batch, PackedBatch) else batch


def split_microbatches(batch: Batch, microbatches: int) -> list[Batch]:
    """Split [global_batch, seq_len + 1] (each field of a PackedBatch alike) into `microbatches`
    equal row blocks, in order.

    The pipeline runtime feeds micro-batch i of the same step with exactly these rows."""
    rows = batch_tokens(batch).shape[0]
    if rows % microbatches:
        raise ValueError(f"batch of {rows} sequences does not split into {microbatches} micro-batches")
    size = rows // microbatches
    if not isinstance(batch, PackedBatch):
        return list(batch.split(size, dim=0))
    fields = zip(batch.tokens.split(size), batch.loss_mask.split(size), batch.segments.split(size))
    return [PackedBatch(tokens, mask, segments) for tokens, mask, segments in fields]


def model_inputs(rows: Batch) -> MicroBatch:
    """Rows of seq_len + 1 tokens -> the model's inputs [b, seq_len], labels shifted by one, the input
    segments and the count of trained labels (no loss scale yet).

    Plain text: labels = tokens[:, 1:], all trained, no segments. PackedBatch: the label at input
    position t is tokens[t + 1] where loss_mask[t + 1] and segments[t + 1] == segments[t] (the
    target is trained and belongs to the input's document), else IGNORE_INDEX; the segments are
    segments[:, :-1]. Count on CPU tensors: it reads the mask on the host."""
    if not isinstance(rows, PackedBatch):
        return MicroBatch(rows[:, :-1], rows[:, 1:], label_count=rows.shape[0] * (rows.shape[1] - 1))
    segments, mask = rows.segments.long(), rows.loss_mask.bool()  # as documented: no copy when they are
    trained = mask[:, 1:] & (segments[:, 1:] == segments[:, :-1])  # [b, seq_len]
    labels = rows.tokens[:, 1:].masked_fill(~trained, IGNORE_INDEX)
    return MicroBatch(rows.tokens[:, :-1], labels, segments[:, :-1], label_count=int(trained.sum()))


def inputs_and_labels(rows: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), each [b, seq_len], of `model_inputs` (for callers without segments)."""
    inputs = model_inputs(rows)
    return inputs.input_ids, inputs.labels


def _target_counts(mb: MicroBatch, mtp_depths: int) -> tuple[int, ...]:
    """(LM labels, MTP depth-1 targets, ..., depth-`mtp_depths` targets) trained in `mb` (host ints;
    CPU tensors). MTP depth k's targets are the model's own (`mtp_targets`): plain text trains
    every one, rows * (seq_len - k)."""
    if mb.segments is None:
        rows, s = mb.labels.shape
        return tuple(rows * max(s - k, 0) for k in range(mtp_depths + 1))
    targets = (mtp_targets(mb.labels, k, mb.segments) for k in range(1, mtp_depths + 1))
    return (mb.label_count, *(int((t != IGNORE_INDEX).sum()) for t in targets))


def target_counts(rows: Batch, mtp_depths: int = 0) -> tuple[int, ...]:
    """`_target_counts` of rows of seq_len + 1 tokens: what a step engine adds up into N."""
    return _target_counts(model_inputs(rows), mtp_depths)


def loss_scale(count: int, total: int, replicas: int = 1) -> float:
    """A micro-batch's loss factor, replicas * n_m / N: summed over every micro-batch of the step and
    averaged over `replicas` (the dp replicas whose gradients the optimizer step averages), the
    factors times the micro-batches' mean losses give the mean over the global batch's N trained
    labels. One division of integers: with equal counts it is exactly the float 1 / M. N == 0
    (nothing to train in the whole step) gives 0."""
    return replicas * count / total if total else 0.0


def _mtp_scales(counts: tuple[int, ...], totals: tuple[int, ...]) -> tuple[float, ...] | None:
    """Each MTP depth's share of its step's targets relative to the micro-batch's LM share (see
    MicroBatch.mtp_scales); None when every one is exactly 1."""
    n, total = counts[0], totals[0]
    scales = tuple(
        (n_k * total) / (total_k * n) if n and total_k else 0.0
        for n_k, total_k in zip(counts[1:], totals[1:])
    )
    return None if all(r == 1.0 for r in scales) else scales


def microbatch_inputs(
    batch: Batch,
    microbatches: int,
    totals: tuple[int, ...] | None = None,
    replicas: int = 1,
    mtp_depths: int = 0,
) -> list[MicroBatch]:
    """The step's micro-batches of `batch` (CPU tensors), each with its labels, segments, count and
    loss factors.

    The step's objective is the mean over every trained LM label of the global batch, plus lambda
    times the mean over depths of each MTP depth's mean over its own trained targets of the
    global batch. Micro-batch m's loss (its LM mean + lambda * mean over depths of its depth means,
    as the model computes it) is scaled by `loss_scale` = replicas * n_m / N, and each depth's
    mean inside it by `mtp_scales`, so every term carries its own token share whatever the split.
    `totals`: (N, N^1, ..., N^D), the global batch's counts (`replica_batch`; None: `batch` is the
    whole global batch, its own counts); `replicas`: dp, when `batch` is one replica's rows;
    `mtp_depths`: the model's MTP depths D."""
    inputs = [model_inputs(rows) for rows in split_microbatches(batch, microbatches)]
    counts = [_target_counts(mb, mtp_depths) for mb in inputs]
    totals = tuple(sum(c) for c in zip(*counts)) if totals is None else totals
    return [
        replace(mb, loss_scale=loss_scale(c[0], totals[0], replicas), mtp_scales=_mtp_scales(c, totals))
        for mb, c in zip(inputs, counts)
    ]


def replica_batch(
    read: Callable[[int, int], Batch], dp_rank: int, dp_size: int, mtp_depths: int = 0
) -> tuple[Batch, tuple[int, ...]]:
    """dp replica `dp_rank`'s rows of one global batch (`read(dp_rank, dp_size)`, e.g.
    `lambda r, n: source.batch(step, r, n)`), and the whole global batch's counts (N, N^1, ...,
    N^D) of trained labels and MTP targets. Plain text: from this replica's shape. Packed: every
    other replica's rows are read too and their masks counted; each rank reads the same numbers,
    so the counts need no collective."""
    mine = read(dp_rank, dp_size)
    if not isinstance(mine, PackedBatch):
        rows, width = mine.shape
        return mine, tuple(rows * dp_size * max(width - 1 - k, 0) for k in range(mtp_depths + 1))
    counts = [target_counts(mine if r == dp_rank else read(r, dp_size), mtp_depths) for r in range(dp_size)]
    return mine, tuple(sum(c) for c in zip(*counts))


def default_batch_source(cfg: TrainConfig) -> BatchSourceLike:
    """The data engineer's BatchSource for this config (imported late: the data stack is optional
    for callers that inject their own source)."""
    from moeforge.platform.data.batches import BatchSource

    return BatchSource(cfg.data, cfg.model.vocab_size, cfg.model.seq_len)
