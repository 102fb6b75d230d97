"""Deferred weight gradients: split a backward pass into B (input gradients) and W (weight gradients).

Zero-bubble pipeline schedules (ZB-H1, DualPipe) run the weight-gradient GEMMs later than the
input-gradient GEMMs to fill pipeline bubbles. Layers that support it (FP8Linear, DeferrableLinear,
GroupedSwiGLUExperts) check for an active store during backward: if one is active they compute the
input gradient now and queue a closure that computes and accumulates the weight gradient.

    store = WeightGradStore()
    with store.defer():              # B: weight gradients of this backward are queued as one batch
        loss.backward()
    ...
    store.pop()                      # W: run the oldest queued batch (one per B, in order)
    store.flush()                    # or run everything queued

Without an active store the gradient goes back through autograd as usual. Deferred gradients are
accumulated by the W step with autograd's rule (`param.grad = g` if None, else `param.grad += g`),
but post-accumulate-grad hooks on the parameter do not fire for them: a runtime that reduces
gradients from such hooks must reduce after the W step instead.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator

import torch

_active: WeightGradStore | None = None  # process-wide: CUDA backward runs on autograd's own threads


def active_store() -> WeightGradStore | None:
    """The store collecting deferred weight gradients right now, or None (compute them at once)."""
    return _active


class WeightGradStore:
    """FIFO of deferred weight-gradient batches, one batch per `defer()` block."""

    def __init__(self) -> None:
        self._queue: collections.deque[list[Callable[[], None]]] = collections.deque()
        self._collecting: list[Callable[[], None]] | None = None

    @contextlib.contextmanager
    def defer(self) -> Iterator[WeightGradStore]:
        """Queue the weight gradients of every backward inside the block as one batch."""
        global _active
        if _active is not None:
            raise RuntimeError("WeightGradStore.defer: another store is already collecting (blocks do not nest)")
        _active, self._collecting = self, []
        try:
            yield self
        finally:
            _active = None
            self._queue.append(self._collecting)
            self._collecting = None

    def put(self, compute: Callable[[], None]) -> None:
        """Called by layers during backward: queue `compute` (it accumulates into .grad itself)."""
        if self._collecting is None:
            raise RuntimeError("WeightGradStore.put: called outside defer()")
        self._collecting.append(compute)

    def pop(self) -> int:
        """Run the oldest queued batch (one W step). Returns how many weight gradients it computed."""
        if not self._queue:
            raise RuntimeError("WeightGradStore.pop: nothing queued (W without a matching deferred B)")
        batch = self._queue.popleft()
        for compute in batch:
            compute()
        return len(batch)

    def flush(self) -> int:
        """Run every queued batch in order. Returns how many weight gradients were computed."""
        done = 0
        while self._queue:
            done += self.pop()
        return done

    def __len__(self) -> int:
        """Queued batches not yet run."""
        return len(self._queue)


def accumulate_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    """param.grad += grad (created on first use), as autograd's accumulation does."""
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad += grad


def deferred_or_now(param: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    """For a layer's backward: the weight gradient `compute()` now (returned to autograd, which
    accumulates it and fires its hooks as usual), or, while a store is deferring, None after
    queueing `compute` to be accumulated into param.grad by the W step."""
    store = active_store()
    if store is None:
        return compute()

    def run() -> None:
        with torch.no_grad():
            accumulate_grad(param, compute())

    store.put(run)
    return None
