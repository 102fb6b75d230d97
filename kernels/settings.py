"""Process-wide launch settings of the Triton kernels, readable without importing Triton.

- SMs left to communication. The persistent GEMMs launch one program per SM and loop over their
  tiles. While an overlapped pipeline pair runs, NCCL's kernels occupy SMs too, and a full-width
  persistent grid then waits for them (or they for it). `set_reserved_sms(n)` leaves n SMs free:
  every persistent grid is max(1, SMs - n) programs (DeepSeek-V3 left 20 of an H800's 132 SMs to
  communication). Default 0. A module global rather than a context variable, so that autograd's
  backward threads see the value the training loop set.
- Warp-specialized GEMM configs in autotuning. They compile for sm_90 but have not yet run on a
  GPU, so the autotuner leaves them out unless MOEFORGE_WARP_SPECIALIZE=1 is set when a kernel is
  first autotuned in the process. The GPU check and the benchmark run them explicitly either way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

WARP_SPECIALIZE_ENV = "MOEFORGE_WARP_SPECIALIZE"
_reserved_sms = 0


def set_reserved_sms(n: int) -> None:
    """Leave `n` SMs to communication kernels: persistent grids use max(1, SMs - n) programs."""
    global _reserved_sms
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"reserved SMs: must be an integer >= 0, got {n!r}")
    _reserved_sms = n


def reserved_sms() -> int:
    """SMs currently left to communication (0: the persistent grids use every SM)."""
    return _reserved_sms


@contextlib.contextmanager
def reserving_sms(n: int) -> Iterator[None]:
    """set_reserved_sms(n) inside the block, the previous value after it."""
    saved = _reserved_sms
    set_reserved_sms(n)
    try:
        yield
    finally:
        set_reserved_sms(saved)


def persistent_programs(sm_count: int, tiles: int, num_programs: int | None = None) -> int:
    """Programs of a persistent grid over `tiles` tiles: `num_programs` when given (tests, the GPU
    check), else the SMs not reserved for communication; never more than the tiles, at least one."""
    if num_programs is None:
        num_programs = sm_count - _reserved_sms
    return max(1, min(num_programs, tiles))


def warp_specialize_autotuning() -> bool:
    """Whether the autotuner may pick warp-specialized GEMM configs (MOEFORGE_WARP_SPECIALIZE=1)."""
    value = os.environ.get(WARP_SPECIALIZE_ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{WARP_SPECIALIZE_ENV}: must be 0 or 1, got {value!r}")
    return value == "1"
