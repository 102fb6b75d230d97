"""The oldest Triton the kernels compile with, and the check made when they are first imported.

Triton 3.4 is the first release with both language features the GEMMs are written in:
`tl.make_tensor_descriptor` (device-side TMA descriptors; 3.3 had it only as
`tl._experimental_make_tensor_descriptor`) and `tl.range(..., warp_specialize=...)` (absent in 3.3),
with the Hopper warp-specialization pass (its compiled sm_90 code has the producer / consumer warp
groups with 3.4.0 already). PyTorch's CUDA wheels pin their Triton: torch 2.8.0 requires
triton==3.4.0, torch 2.7.0 triton==3.3.0, so the floor also means torch >= 2.8 on a GPU machine.

Importing this module does not import Triton.
"""

from __future__ import annotations

import re

TRITON_FLOOR = (3, 4)


def _as_tuple(version: str) -> tuple[int, ...]:
    """Leading numeric release parts of a version string: "3.4.0+git1a2b" -> (3, 4, 0)."""
    parts = []
    for part in version.split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.group() != part:
            break
    return tuple(parts)


def installed_triton_version() -> str:
    """The version string of the importable Triton (ImportError when there is none)."""
    import triton

    return triton.__version__


def triton_version_problem(version: str) -> str | None:
    """Why Triton `version` cannot run the kernels (naming it and the floor), or None if it can."""
    floor = ".".join(map(str, TRITON_FLOOR))
    if _as_tuple(version) >= TRITON_FLOOR:
        return None
    return (
        f"moeforge's FP8 Triton kernels need triton >= {floor} (tl.make_tensor_descriptor, "
        f"tl.range(warp_specialize=...)); installed: triton {version}"
    )


def check_triton_version() -> None:
    """Raise ImportError, naming the installed and the required version, if Triton is too old."""
    problem = triton_version_problem(installed_triton_version())
    if problem is not None:
        raise ImportError(problem)
