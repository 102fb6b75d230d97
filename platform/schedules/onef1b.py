"""1F1B (one forward, one backward): the classic non-interleaved pipeline schedule.

Rank r of pp holds stage r. It runs min(pp-1-r, M) warm-up forwards, then alternates one forward and one
full backward until every forward is issued, then drains the remaining backwards. At most pp-r
micro-batches are in flight on rank r, so rank 0 holds pp activations.
"""

from __future__ import annotations

from moeforge.platform.schedules.actions import Schedule
from moeforge.platform.schedules.builder import RankBuilder, linear_schedule, require_basic


def one_f_one_b(pp: int, num_microbatches: int) -> Schedule:
    require_basic(pp, num_microbatches)
    m = num_microbatches
    lists = []
    for rank in range(pp):
        rb = RankBuilder([range(m)])
        warmup = min(pp - 1 - rank, m)

        # Warm-up: fill the pipeline downstream of this rank.
        for _ in range(warmup):
            rb.forward(0)

        # Steady state: one forward, then the backward of the oldest micro-batch in flight.
        for _ in range(m - warmup):
            rb.forward(0)
            rb.backward(0)

        # Cool-down: drain the backwards of the warm-up forwards.
        for _ in range(warmup):
            rb.backward(0)
        lists.append(rb.actions)

    return linear_schedule("1f1b", pp, m, lists)
