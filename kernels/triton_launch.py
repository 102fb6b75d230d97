"""Fixed launch parameters under Triton's CPU interpreter, autotuned ones on a GPU."""

from __future__ import annotations

import triton
from moeforge.kernels.backend import interpreting


def launcher(kernel, gpu_configs: list[triton.Config], key: list[str], interpret_meta: dict):
    """(callable kernel, extra launch kwargs): the kernel with `interpret_meta` when interpreting
    (fast, and shaped to exercise partial tiles at tiny sizes), else autotuned over `gpu_configs`,
    re-tuned whenever the values of the `key` arguments change."""
    if interpreting():
        return kernel, dict(interpret_meta)
    return triton.autotune(configs=gpu_configs, key=key)(kernel), {}
