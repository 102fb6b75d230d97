"""Argument checks shared by the public kernel entry points: every message names the argument.

Checks run before either backend does any work, so the Triton kernels and their torch twins refuse
the same inputs with the same words.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from moeforge.kernels.fp8_format import FP8_DTYPE, HIGH_PRECISION_DTYPES


class KernelArgumentError(ValueError):
    """A kernel argument has the wrong dtype, layout or shape. The message names the argument."""


def fail(op: str, arg: str, message: str) -> None:
    raise KernelArgumentError(f"{op}: {arg}: {message}")


def check_high_precision(op: str, arg: str, t: torch.Tensor, min_dim: int = 1) -> None:
    if not isinstance(t, torch.Tensor):
        fail(op, arg, f"expected a tensor, got {type(t).__name__}")
    if t.dtype not in HIGH_PRECISION_DTYPES:
        fail(op, arg, f"expected float32/bfloat16/float16, got {t.dtype}")
    if t.dim() < min_dim:
        fail(op, arg, f"expected at least {min_dim} dimensions, got shape {list(t.shape)}")


def check_fp8(op: str, arg: str, t: torch.Tensor, dim: int | Sequence[int]) -> None:
    if not isinstance(t, torch.Tensor):
        fail(op, arg, f"expected a tensor, got {type(t).__name__}")
    if t.dtype != FP8_DTYPE:
        fail(op, arg, f"expected {FP8_DTYPE}, got {t.dtype}")
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if t.dim() not in dims:
        fail(op, arg, f"expected {' or '.join(map(str, dims))} dimensions, got shape {list(t.shape)}")
    if not t.is_contiguous():
        fail(op, arg, "must be contiguous (call .contiguous())")


def check_scales(op: str, arg: str, s: torch.Tensor, shapes: dict[str, tuple[int, ...]]) -> str:
    """Scales must be contiguous float32 with one of the `shapes` (label -> shape). Returns the label."""
    if not isinstance(s, torch.Tensor):
        fail(op, arg, f"expected a tensor, got {type(s).__name__}")
    if s.dtype != torch.float32:
        fail(op, arg, f"scales must be float32, got {s.dtype}")
    for label, shape in shapes.items():
        if tuple(s.shape) == tuple(shape):
            if not s.is_contiguous():
                fail(op, arg, "scales must be contiguous (call .contiguous())")
            return label
    wanted = " or ".join(f"{list(shape)} ({label})" for label, shape in shapes.items())
    fail(op, arg, f"expected shape {wanted}, got {list(s.shape)}")
    raise AssertionError  # unreachable: fail() raises


def check_block_multiple(op: str, arg: str, size: int, block: int, what: str) -> None:
    if size % block:
        fail(
            op,
            arg,
            f"{what} ({size}) must be a multiple of the block size {block}; "
            "pad it with zeros first (moeforge.kernels.fp8_format.round_up)",
        )


def check_block_size(op: str, block_size: int) -> None:
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        fail(op, "block_size", f"must be a power of two >= 16, got {block_size!r}")


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    for name, device in devices.items():
        if device != first:
            fail(op, name, f"on {device}, but the other arguments are on {first}")


def group_sizes_list(
    op: str, group_sizes, total: int, groups: int | None = None, padded_to: int | None = None
) -> list[int]:
    """Validate rows per group (a tensor or a list) and return them as a host list (a tensor is
    read back: one sync, for the torch twins, which split on host sizes). With `padded_to`, each
    group occupies its size rounded up to that multiple; the segments of a list must add up to
    `total` exactly (act_quant_transpose's exact layout), those of a tensor must fit in it (its
    capacity layout)."""
    if isinstance(group_sizes, torch.Tensor):
        _check_sizes_tensor(op, group_sizes, groups)
        sizes = group_sizes.tolist()
        exact = padded_to is None
    else:
        sizes = list(group_sizes)
        exact = True
    if any(not isinstance(n, int) or n < 0 for n in sizes):
        fail(op, "group_sizes", f"entries must be integers >= 0, got {sizes}")
    if groups is not None and len(sizes) != groups:
        fail(op, "group_sizes", f"expected {groups} entries (one per group), got {len(sizes)}")
    counted = sum(-(-n // padded_to) * padded_to for n in sizes) if padded_to else sum(sizes)
    if counted != total if exact else counted > total:
        what = f"segments padded to {padded_to}" if padded_to else "entries"
        fail(op, "group_sizes", f"{what} add up to {counted}, but the input has {total} rows")
    return sizes


def group_sizes_arg(
    op: str, group_sizes, total: int, groups: int | None = None, padded_to: int | None = None, *, host: bool
) -> list[int] | torch.Tensor:
    """Rows per group for a kernel: a checked host list (`group_sizes_list`), or, when `host` is
    False (the Triton path) and they come as a device tensor, the tensor itself with only its
    dtype, shape and device checked: its values stay on the device (reading them back would make
    the host wait for the GPU); the Triton kernels clamp them instead (`group_tables`)."""
    if host or not isinstance(group_sizes, torch.Tensor):
        return group_sizes_list(op, group_sizes, total, groups, padded_to)
    _check_sizes_tensor(op, group_sizes, groups)
    return group_sizes


def _check_sizes_tensor(op: str, group_sizes: torch.Tensor, groups: int | None) -> None:
    if group_sizes.dim() != 1 or group_sizes.dtype not in (torch.int32, torch.int64):
        fail(op, "group_sizes", f"expected a 1-D int32/int64 tensor, got {group_sizes.dtype} {list(group_sizes.shape)}")
    if groups is not None and group_sizes.shape[0] != groups:
        fail(op, "group_sizes", f"expected {groups} entries (one per group), got {group_sizes.shape[0]}")
