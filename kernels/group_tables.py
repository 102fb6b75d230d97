"""Device-side tables of a grouping (rows per expert) for the grouped Triton kernels, built without a
host read.

Group sizes arrive either as a host list or as a device tensor (the counts the MoE router computes on
the GPU). On a GPU the host must run ahead of the device, so nothing here reads a device tensor back
or copies a pageable host table to the device (each would wait for the queued work): tensors are
turned into tables by device ops (cumsum, clamp), lists by a fill kernel (one group) or a
non-blocking copy from pinned memory.

Counts in a tensor are not checked (that would need a host read). They are clamped instead, so that
negative counts, or counts adding up to more than the rows present, make a wrong result, never an
access outside the operands: every group's rows end at `total` at most, and every group's token segment inside the
given capacity. Tables are memoised per counts tensor (same live object, same version), since every
GEMM of a layer's forward and backward reads the same counts.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable

import torch

GroupSizes = list[int] | torch.Tensor

# BLOCK_M values the grouped GEMM's tile table has a row for (its launch configs and the interpreter's):
# 16 .. 256, powers of two, so the device builds them with an arange (no host table).
_TABLE_LOG2 = range(4, 9)
TABLE_BLOCK_M = tuple(2**e for e in _TABLE_LOG2)

_memo: dict[tuple, tuple[weakref.ref, int, torch.Tensor]] = {}


def _memoised(counts: torch.Tensor, key: Hashable, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    full_key = (id(counts), key)
    entry = _memo.get(full_key)
    if entry is not None and entry[0]() is counts and entry[1] == counts._version:
        return entry[2]
    value = build()
    if entry is None:
        weakref.finalize(counts, _memo.pop, full_key, None)  # the entry dies with the counts
    _memo[full_key] = (weakref.ref(counts), counts._version, value)
    return value


def _from_host(values: list[int], device: torch.device) -> torch.Tensor:
    """int32 [len(values)] on `device` without waiting for the device."""
    if len(values) == 1:
        return torch.full((1,), values[0], dtype=torch.int32, device=device)  # a fill kernel, no copy
    table = torch.tensor(values, dtype=torch.int32)
    if device.type == "cuda":  # pinned + non_blocking: queued behind the stream's work, no host wait
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


def _clamped(counts: torch.Tensor, total: int) -> torch.Tensor:
    """int64 [G]: the counts (negative ones as 0), each cut so that the running sum never passes `total`."""
    ends = torch.cumsum(counts.to(torch.int64).clamp(min=0), 0).clamp(max=total)  # [G]
    return torch.diff(ends, prepend=ends.new_zeros(1))


def _exclusive_prefix(counts: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """[..., G] -> [..., G + 1]: 0, c0, c0 + c1, ..."""
    zeros = counts.new_zeros(*counts.shape[:-1], 1)
    return torch.cat([zeros, torch.cumsum(counts, dim)], dim)


def group_counts(sizes: GroupSizes, total: int, device: torch.device) -> torch.Tensor:
    """int32 [G] rows per group on `device` (a tensor's counts clamped to `total` rows in all)."""
    if isinstance(sizes, list):
        return _from_host(sizes, device)
    return _memoised(sizes, ("counts", total), lambda: _clamped(sizes.to(device), total).to(torch.int32))


def grouped_gemm_table(sizes: GroupSizes, total: int, device: torch.device) -> torch.Tensor:
    """The grouped GEMM's table, int32 [1 + len(TABLE_BLOCK_M), G + 1] on `device`: row 0 the groups'
    first rows (exclusive prefix of the sizes, ending at the rows in all), then for each BLOCK_M of
    TABLE_BLOCK_M the exclusive prefix of the groups' row-tile counts ceil(n_g / BLOCK_M)."""

    def build() -> torch.Tensor:
        counts = group_counts(sizes, total, device).to(torch.int64)  # [G]
        block_m = 2 ** torch.arange(_TABLE_LOG2.start, _TABLE_LOG2.stop, device=device, dtype=torch.int64)
        tiles = (counts[None, :] + block_m[:, None] - 1) // block_m[:, None]  # [len(TABLE_BLOCK_M), G]
        return _exclusive_prefix(torch.cat([counts[None, :], tiles])).to(torch.int32)  # [6, G + 1]

    return build() if isinstance(sizes, list) else _memoised(sizes, ("gemm_table", total), build)


def segment_block_prefix(sizes: GroupSizes, block: int, capacity_blocks: int, device: torch.device) -> torch.Tensor:
    """int32 [G + 1] on `device`: where each group's block-aligned token segment starts, in blocks
    (exclusive prefix of ceil(n_g / block)), clamped to `capacity_blocks`."""

    def build() -> torch.Tensor:
        counts = group_counts(sizes, capacity_blocks * block, device).to(torch.int64)
        blocks = _clamped((counts + block - 1) // block, capacity_blocks)  # [G]
        return _exclusive_prefix(blocks).to(torch.int32)

    return build() if isinstance(sizes, list) else _memoised(sizes, ("segments", block, capacity_blocks), build)


def sizes_key(sizes: GroupSizes | None) -> Hashable:
    """A hashable stand-in for group sizes in memo keys: the values of a list, the identity of a
    tensor (its values are on the device; the key holds it, so its id cannot be reused meanwhile)."""
    if sizes is None or isinstance(sizes, list):
        return None if sizes is None else tuple(sizes)
    return _Identity(sizes)


class _Identity:
    __slots__ = ("obj",)

    def __init__(self, obj) -> None:
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Identity) and other.obj is self.obj
