"""How every Triton kernel here is launched: fixed meta under the CPU interpreter, autotuned on a GPU.

Autotuning keys. `triton.autotune` benchmarks every config again for each new value of its key. Under
expert parallelism the rows routed to a rank change every layer and micro-batch, so a key holding a
row count would re-tune almost every call (seconds each, long enough to trip peer timeouts). The keys
here name only sizes the model fixes (K, N, channels); fp8_gemm adds `row_bucket(M)`, one of four
classes, passed as a kernel argument of its own. Every launch computes the key the way Triton's
autotuner does (`TritonKernel.key_values`: the key arguments, then each tensor argument's dtype) and
hands it to `record_launches()` listeners, on the interpreter and on a GPU alike, so a test can count
the keys a sweep of row counts presents (moeforge.platform.bench.launch_audit).

Specialisation. Triton also compiles a kernel again when an integer argument moves between 1, a
multiple of 16 and anything else. The kernels declare their data-dependent integers (row counts,
padded token counts) `do_not_specialize`, so those compile once; sizes that must stay known multiples
of 128 are passed as block counts and multiplied inside the kernel.

Importing this module checks the Triton version (`triton_version.check_triton_version`) and raises
ImportError when it is too old; backend.use_triton() then never routes a call here.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from moeforge.kernels.triton_version import check_triton_version

check_triton_version()  # before anything else reads Triton: a too-old one fails with this message

import torch
import triton
from moeforge.kernels.backend import interpreting

ROW_BUCKETS = (64, 512, 4096, 32768)


def row_bucket(rows: int) -> int:
    """The autotuning class of a row count: the smallest of ROW_BUCKETS >= rows, else the largest.
    Four classes whatever the data: small-M tiles for decode-sized batches, large tiles beyond."""
    return next((bucket for bucket in ROW_BUCKETS if rows <= bucket), ROW_BUCKETS[-1])


@dataclass(frozen=True)
class LaunchRecord:
    """One launch: the kernel, the values Triton's autotuner keys on (for a kernel launched without
    autotuning, the same arguments describe its shape), the other keyword arguments (compile-time
    flags such as UE8M0: each value is a compiled variant of its own) and whether a GPU launch
    would autotune."""

    kernel: str
    key: tuple
    flags: tuple
    autotuned: bool


_listeners: list[list[LaunchRecord]] = []


@contextlib.contextmanager
def record_launches() -> Iterator[list[LaunchRecord]]:
    """Collect a LaunchRecord for every kernel launched inside the block (any thread)."""
    records: list[LaunchRecord] = []
    _listeners.append(records)
    try:
        yield records
    finally:
        _listeners.remove(records)


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """Device-side tensor descriptors live in a per-program global scratch that Triton allocates
    through `triton.set_allocator`. The allocator is a context variable (autograd's backward
    threads start without it), so it is checked before each launch; one set by the user is kept."""
    try:
        from triton.runtime import _allocation

        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # another Triton layout: set ours
        pass
    triton.set_allocator(_scratch)


class TritonKernel:
    """One kernel and its launch policy.

    `key`: the arguments autotuning keys on (data-independent sizes only, see the module docstring).
    `configs`: a function returning the GPU autotuning configs, or None for a kernel launched with
    Triton's defaults. `interpret_meta`: the meta used under the interpreter (small tiles, to hit
    partial tiles at tiny sizes). `descriptors`: the kernel makes tensor descriptors in device code.
    A launch may name one `config` instead of autotuning (the GPU check runs each)."""

    def __init__(
        self,
        name: str,
        fn,
        key: tuple[str, ...],
        *,
        configs: Callable[[], list[triton.Config]] | None = None,
        interpret_meta: dict | None = None,
        descriptors: bool = False,
    ) -> None:
        unknown = [k for k in key if k not in fn.arg_names]
        if unknown:
            raise ValueError(f"{name}: autotuning key names {unknown}, which are not arguments of the kernel")
        self.name, self.fn, self.key = name, fn, tuple(key)
        self.configs, self.interpret_meta, self.descriptors = configs, dict(interpret_meta or {}), descriptors

    def key_values(self, args: tuple, kwargs: dict) -> tuple:
        """What triton.autotune keys this launch on: the key arguments' values, then the dtype of
        every tensor argument (the order Triton's Autotuner.run builds them in)."""
        named = dict(zip(self.fn.arg_names, args))
        named.update((k, v) for k, v in kwargs.items() if k in self.fn.arg_names)
        return tuple(named[k] for k in self.key) + tuple(str(v.dtype) for v in named.values() if hasattr(v, "dtype"))

    @functools.cached_property
    def tuned(self):
        """The autotuner, built on first use from the configs allowed then
        (`settings.warp_specialize_autotuning`)."""
        return triton.autotune(configs=self.configs(), key=list(self.key))(self.fn)

    def __call__(self, grid, *args, config: triton.Config | None = None, **kwargs) -> None:
        autotuned = self.configs is not None and config is None
        if _listeners:
            flags = tuple(sorted((k, v) for k, v in kwargs.items() if k not in self.key))
            record = LaunchRecord(self.name, self.key_values(args, kwargs), flags, autotuned)
            for listener in _listeners:
                listener.append(record)
        if interpreting():
            self.fn[grid](*args, **kwargs, **self.interpret_meta)
            return
        if self.descriptors:
            ensure_allocator()
        if config is not None:
            self.fn[grid](*args, **kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        elif autotuned:
            self.tuned[grid](*args, **kwargs)
        else:
            self.fn[grid](*args, **kwargs)
