"""Run-time choice between the Triton kernels and their torch twins.

`auto` (the default): Triton for CUDA tensors, the torch twin for CPU tensors, except that
`TRITON_INTERPRET=1` (set before triton is first imported) runs the Triton kernels on CPU tensors too,
which is how the tests hold the two against each other without a GPU. `MOEFORGE_KERNELS=torch|triton`
or `use_backend(...)` forces one (benchmarks compare them; `triton` on CPU needs the interpreter).
Without a usable Triton (none installed, or one older than triton_version.TRITON_FLOOR) every call
runs the twin, and the reason is given once as a warning.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator

import torch
from moeforge.kernels import triton_version

BACKENDS = ("auto", "triton", "torch")
_forced: str | None = None


@functools.cache
def triton_unavailable_reason() -> str | None:
    """Why the Triton kernels cannot run in this process (None: they can). Warns once."""
    try:
        reason = triton_version.triton_version_problem(triton_version.installed_triton_version())
    except ImportError as err:
        reason = f"triton cannot be imported ({err})"
    if reason is not None:
        warnings.warn(f"{reason}: the kernels run their torch twins", RuntimeWarning, stacklevel=2)
    return reason


def triton_available() -> bool:
    """Whether a Triton recent enough for the kernels is installed (see
    `triton_version.triton_version_problem`)."""
    return triton_unavailable_reason() is None


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
            raise RuntimeError(f"MOEFORGE_KERNELS=triton, but {triton_unavailable_reason()}")
        if not on_cuda and not interpreting():
            raise RuntimeError("the triton backend on CPU tensors needs TRITON_INTERPRET=1 set before import")
        return True
    return (on_cuda or interpreting()) and triton_available()
