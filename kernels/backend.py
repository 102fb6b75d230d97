"""Run-time choice between the Triton kernels and their torch twins.

`auto` (the default): Triton for CUDA tensors, the torch twin for CPU tensors, except that
`TRITON_INTERPRET=1` (set before triton is first imported) runs the Triton kernels on CPU tensors too,
which is how the tests hold the two against each other without a GPU. `MOEFORGE_KERNELS=torch|triton`
or `use_backend(...)` forces one (benchmarks compare them; `triton` on CPU needs the interpreter).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "torch")
_forced: str | None = None


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def current_backend() -> str:
    name = _forced or os.environ.get("MOEFORGE_KERNELS", "auto")
    if name not in BACKENDS:
        raise ValueError(f"MOEFORGE_KERNELS: must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force `name` ('triton', 'torch' or 'auto') for the kernel calls inside the block."""
    global _forced
    if name not in BACKENDS:
        raise ValueError(f"backend: must be one of {BACKENDS}, got {name!r}")
    saved, _forced = _forced, name
    try:
        yield
    finally:
        _forced = saved


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the kernels for these tensors run through Triton (else through the torch twin)."""
    name = current_backend()
    if name == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if name == "triton":
        if not triton_available():
            raise RuntimeError("MOEFORGE_KERNELS=triton but triton is not installed")
        if not on_cuda and not interpreting():
            raise RuntimeError("the triton backend on CPU tensors needs TRITON_INTERPRET=1 set before import")
        return True
    return triton_available() and (on_cuda or interpreting())
