"""The EP collectives, inside autograd: counts first, then rows with uneven splits.

Every call is collective over `group`: each EP rank must make the same calls in the same order
(dp replicas of a stage run the same schedule action list, so their MoE layers do). Splits are in
rows, per destination rank in group order. Works on gloo (CPU) and NCCL (GPU) alike.

    exchange_counts     how many rows each rank will send me (one small all-to-all; its own group
                        may be given, so that it does not queue behind bulk all-to-alls)
    all_to_all_rows     rows of any dtype; backward sends the gradient back the reverse way
    launch_all_to_all   one asynchronous all-to-all (outside autograd), awaited where its result is
                        consumed: the phase programs of DualPipe's overlap (phased.py, the overlap bench)
    dispatch_rows_fp8   rows as FP8 e4m3 with 1x128 power-of-two tile scales (kernels/token_compress),
                        D + D/128 bytes per row; decompressed on arrival. Backward: the gradient
                        travels back in the compute dtype, unquantised (straight through the
                        rounding), as DeepSeek-V3 keeps the backward combine/dispatch in BF16.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from moeforge.kernels.token_compress import compress_tokens, decompress_tokens


def exchange_counts(send_counts: torch.Tensor, group) -> torch.Tensor:
    """send_counts [ep, ...] (what I send each rank: row r goes to rank r) -> recv_counts [ep, ...]
    (row r: what rank r sends me). Stays on the device; reading it is the caller's choice."""
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts.contiguous(), group=group)
    return recv


@dataclass
class InFlight:
    """An all-to-all launched asynchronously: `out` is valid once `wait()` returned."""

    work: object
    out: torch.Tensor

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.out


class CollectiveTracker(Protocol):
    """Something that times launched collectives (the rank's P2P endpoint): wraps the work so that
    its wait is recorded (exposed time, timeline span)."""

    def track_collective(self, work: object, out: torch.Tensor, label: str): ...


def launch_all_to_all(
    x: torch.Tensor,
    send_splits: list[int],
    recv_splits: list[int],
    group,
    tracker: CollectiveTracker | None = None,
    label: str = "all-to-all",
):
    """Start x [sum(send_splits), ...] -> [sum(recv_splits), ...] without waiting; the returned handle's
    `wait()` gives the received rows. With a `tracker`, the wait is timed under `label`."""
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    work = dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group, async_op=True)
    if tracker is not None:
        return tracker.track_collective(work, out, label)
    return InFlight(work, out)


def _exchange(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return _exchange(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        return _exchange(grad, recv_splits, send_splits, ctx.group), None, None, None


def all_to_all_rows(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    """x [sum(send_splits), ...] -> [sum(recv_splits), ...]: rows send_splits[r] go to rank r."""
    return _AllToAllRows.apply(x, send_splits, recv_splits, group)


class _DispatchFP8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group, out_dtype, on_wire):
        ctx.splits, ctx.group, ctx.in_dtype = (send_splits, recv_splits), group, x.dtype
        d = x.shape[-1]
        payload, scales = compress_tokens(x)  # [T, D] e4m3 bits, [T, D/128] exponents
        packed = torch.cat([payload, scales], dim=-1)  # [T, D + D/128] uint8: one message per row
        if on_wire is not None:
            on_wire(packed)
        received = _exchange(packed, send_splits, recv_splits, group)
        return decompress_tokens(received[:, :d], received[:, d:], out_dtype)

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        grad_in = _exchange(grad, recv_splits, send_splits, ctx.group)
        return grad_in.to(ctx.in_dtype), None, None, None, None, None


def dispatch_rows_fp8(
    x: torch.Tensor,
    send_splits: list[int],
    recv_splits: list[int],
    group,
    out_dtype: torch.dtype,
    on_wire: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """x [T, D] (D a multiple of 128) -> [sum(recv_splits), D] in `out_dtype`, sent as FP8 tiles.
    `on_wire` (optional) sees the packed uint8 tensor handed to the all-to-all: what travels."""
    return _DispatchFP8.apply(x, send_splits, recv_splits, group, out_dtype, on_wire)


def fp8_row_bytes(hidden: int) -> int:
    """Bytes one row occupies on the wire under FP8 dispatch: e4m3 values plus one scale per 128."""
    return hidden + hidden // 128
