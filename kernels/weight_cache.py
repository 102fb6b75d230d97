"""FP8 copies of master weights, made once per optimizer step and reused by every micro-batch.

A step with m micro-batches runs each FP8 GEMM's weight operand m times forward and m times
backward (as W^T). Quantizing the FP32 master weight each time reads 4 bytes and writes 1 per
parameter per use, about 12 bytes of traffic per parameter per micro-batch with both layouts, which
for the routed experts costs about as much as their GEMMs. The weight does not change between
optimizer steps, so both layouts are quantized once and kept here.

An entry is used only while all of these hold, so a stale copy cannot reach a GEMM:
- the weight is the same live tensor object (held by a weak reference: the cache never keeps a
  parameter alive, and an entry dies with its parameter);
- its version counter is unchanged: any in-place update (an optimizer step, `copy_`, `add_`) bumps it;
- the cache's epoch is unchanged: `invalidate()` is called after every optimizer step (the one
  AdamW builder, `platform.optim.adamw.build_adamw`, registers it), which also covers updates that bypass the
  version counter, such as writes through `param.data` (as DeepSpeed's ZeRO does).

Memory: 1 byte per parameter per layout (forward W and transposed W^T), plus 4/16384 for scales.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

QuantizedWeight = tuple[torch.Tensor, torch.Tensor]  # (e4m3 data, FP32 block scales)


@dataclass
class _Entry:
    weight: weakref.ref
    version: int
    epoch: int
    value: QuantizedWeight


class FP8WeightCache:
    """Quantized weights keyed by (parameter, layout); see the module docstring for validity."""

    def __init__(self) -> None:
        self._entries: dict[tuple[int, bool], _Entry] = {}
        self.epoch = 0
        self.quantizations = 0  # how many times a weight was actually quantized (tests read it)
        self.enabled = True
        self._bypassed = False

    def get(
        self,
        weight: torch.Tensor,
        transposed: bool,
        quantize: Callable[[torch.Tensor, bool], QuantizedWeight],
    ) -> QuantizedWeight:
        """The cached quantize(weight, transposed), recomputed when the entry is stale or missing."""
        if self._bypassed:
            return quantize(weight, transposed)
        if not self.enabled:
            self.quantizations += 1
            return quantize(weight, transposed)
        key = (id(weight), transposed)
        entry = self._entries.get(key)
        if (
            entry is not None
            and entry.weight() is weight
            and entry.version == weight._version
            and entry.epoch == self.epoch
        ):
            return entry.value
        value = quantize(weight, transposed)
        self.quantizations += 1
        if entry is None:
            # Drop the entries of a parameter when it is garbage-collected, so an id reused by a
            # new tensor can never find them (the weak reference check would also refuse them).
            weakref.finalize(weight, self._entries.pop, key, None)
        self._entries[key] = _Entry(weakref.ref(weight), weight._version, self.epoch, value)
        return value

    @contextlib.contextmanager
    def bypassed(self) -> Iterator[None]:
        """Quantize every weight afresh inside the block, leaving entries and counters untouched
        (the kernel warm-up runs the GEMMs on stand-in weights)."""
        saved, self._bypassed = self._bypassed, True
        try:
            yield
        finally:
            self._bypassed = saved

    def invalidate(self) -> None:
        """Mark every entry stale (call after each optimizer step) and free the copies."""
        self.epoch += 1
        for entry in self._entries.values():
            entry.value = None  # type: ignore[assignment]  # the epoch check already refuses it


WEIGHT_CACHE = FP8WeightCache()


def invalidate_fp8_weight_cache() -> None:
    """After an optimizer step: the next FP8 GEMM of every weight re-quantizes it."""
    WEIGHT_CACHE.invalidate()
