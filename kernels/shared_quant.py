"""One FP8 quantization of an activation that several GEMMs read.

Two projections often read the same tensor: the experts' gate and up projections read the sorted
tokens, MLA's q_a and kv_a projections read the normed hidden state. Quantized separately, the
input is read and quantized twice, and each projection saves its own FP8 copy for the weight
gradient: the activation is cached twice. Here the second consumer gets the first one's results,
the very same tensors, so the FP8 copy exists once in memory however many autograd nodes save it.

The memo remembers the results for one source tensor only (the latest one quantized), so at most
one activation's forward-only FP8 copy outlives its GEMMs, until the next layer's input replaces it.
A result is reused only while the source is the same live object (weak reference) with the same
version counter, and for the same operation and arguments.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Hashable, Iterator

import torch

_source: weakref.ref | None = None
_version = -1
_results: dict[Hashable, tuple[torch.Tensor, ...]] = {}
stats = {"quantized": 0, "reused": 0}  # counters for tests


def shared_quantization(
    source: torch.Tensor, key: Hashable, quantize: Callable[[], tuple[torch.Tensor, ...]]
) -> tuple[torch.Tensor, ...]:
    """quantize() of a tensor derived from `source` alone, memoised per (source, key).

    `key` names the operation and every argument besides the source (e.g. ("act_quant", padded K,
    scale format)); `quantize` must be a pure function of the source and the key."""
    global _source, _version
    if _source is None or _source() is not source or _version != source._version:
        _results.clear()
        _source, _version = weakref.ref(source), source._version
    result = _results.get(key)
    if result is None:
        result = _results[key] = quantize()
        stats["quantized"] += 1
    else:
        stats["reused"] += 1
    return result


def clear_shared_quantization() -> None:
    """Forget the memo (frees the last forward-only FP8 copy)."""
    global _source
    _source = None
    _results.clear()


@contextlib.contextmanager
def isolated() -> Iterator[None]:
    """Run the block against an empty memo, then put the memo and its counters back as they were
    (the kernel warm-up quantizes stand-in inputs without disturbing the real ones)."""
    global _source, _version, _results
    saved = (_source, _version, _results, dict(stats))
    _source, _version, _results = None, -1, {}
    try:
        yield
    finally:
        _source, _version, _results = saved[0], saved[1], saved[2]
        stats.clear()
        stats.update(saved[3])
