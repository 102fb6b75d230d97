"""A rank's piece of a tensor the whole model holds: what makes a checkpoint layout-independent.

Every tensor a rank saves is either a whole tensor of the model (a dense weight, a router bias, an
AdamW moment of a weight the rank holds whole) or a contiguous run of one in row-major (flattened)
order:

- an expert-parallel rank holds experts [e0, e1) of a stacked `[experts, ...]` weight: rows
  e0..e1 of dim 0, which is one flat run starting at e0 * (elements per expert);
- a ZeRO rank holds a contiguous slice of the flat buffer of its parameter group, which cuts each
  parameter it touches into one flat run (of the rank's local tensor, itself possibly an expert
  slice: the two offsets add).

`ShardedTensor(local, global_shape, offset)` records that: `local` holds elements
[offset, offset + local.numel()) of a tensor of `global_shape`, flattened. A checkpoint writes each
piece with its global shape and offset (`platform.checkpoint.store.save_shard`), so a reader in ANY layout can
assemble the run of elements it needs from whichever shards hold them
(`platform.checkpoint.reshard.CheckpointReader`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class ShardedTensor:
    """`local` is elements [offset, offset + local.numel()) of the flattened `global_shape` tensor."""

    local: torch.Tensor
    global_shape: tuple[int, ...]
    offset: int = 0

    def __post_init__(self) -> None:
        self.global_shape = tuple(int(d) for d in self.global_shape)
        total = math.prod(self.global_shape)
        if self.offset < 0 or self.offset + self.local.numel() > total:
            raise ValueError(
                f"piece [{self.offset}, {self.offset + self.local.numel()}) does not fit a tensor of "
                f"shape {list(self.global_shape)} ({total} elements)"
            )

    @property
    def stop(self) -> int:
        return self.offset + self.local.numel()

    @property
    def is_whole(self) -> bool:
        return self.offset == 0 and self.local.numel() == math.prod(self.global_shape)


def rows_piece(local: torch.Tensor, global_rows: int, first_row: int) -> ShardedTensor:
    """Rows [first_row, first_row + local.shape[0]) of a tensor with `global_rows` rows along dim 0
    and local's other dims (an expert-parallel slice of stacked experts)."""
    per_row = math.prod(local.shape[1:])
    return ShardedTensor(local, (global_rows, *local.shape[1:]), first_row * per_row)
