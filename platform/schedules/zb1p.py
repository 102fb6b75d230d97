"""ZB1P: the zero-bubble schedule ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", 2023).

The backward is split into B (input gradient, on the critical path between ranks) and W (weight
gradient, needed only by the optimizer step). ZB-H1 keeps 1F1B's order of forwards and input-gradient
backwards, so its peak activation memory stays at pp-r micro-batches on rank r, but rank r postpones
its weight gradients: it keeps the first r of them pending and runs them at the very end, where 1F1B
would leave rank r idle waiting for the last gradients to come back.

Rank r (of pp, M micro-batches):
  1. warm-up:      min(pp-1-r, M) forwards
  2. steady state: [F, B] per remaining forward, plus a W once r Ws are already pending
  3. cool-down:    [B] per remaining backward, plus a W while more than r are pending
  4. flush:        the r pending Ws
"""

from __future__ import annotations

from moeforge.platform.schedules.actions import Schedule
from moeforge.platform.schedules.builder import RankBuilder, linear_schedule, require_basic


def zb1p(pp: int, num_microbatches: int) -> Schedule:
    require_basic(pp, num_microbatches)
    m = num_microbatches
    lists = []
    for rank in range(pp):
        rb = RankBuilder([range(m)])
        warmup = min(pp - 1 - rank, m)
        deferred = rank  # Ws this rank holds back to fill its cool-down bubble

        # Phase 1: warm-up forwards.
        for _ in range(warmup):
            rb.forward(0)

        # Phase 2: steady state, one forward and one input-gradient backward; W once enough are held.
        for _ in range(m - warmup):
            rb.forward(0)
            rb.backward(0, split=True)
            if len(rb.pending_w) > deferred:
                rb.weight()

        # Phase 3: cool-down backwards, with Ws beyond the deferred ones.
        for _ in range(warmup):
            rb.backward(0, split=True)
            if len(rb.pending_w) > deferred:
                rb.weight()

        # Phase 4: flush the deferred weight gradients into the tail bubble.
        while rb.pending_w:
            rb.weight()
        lists.append(rb.actions)

    return linear_schedule("zb1p", pp, m, lists)
