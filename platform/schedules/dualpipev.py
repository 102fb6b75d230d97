"""DualPipeV: DualPipe "cut in half" into a V shape, one direction, half the parameter memory.

Layout: rank r holds stage r (chunk 0) and stage 2pp-1-r (chunk 1) of a 2pp-stage model. Every
micro-batch goes down chunk 0 of ranks 0..pp-1, turns on rank pp-1 (chunk 0 -> chunk 1, no transfer)
and comes back up chunk 1 of ranks pp-1..0, where rank 0 computes the loss. Each stage lives on one rank.

The per-rank program is DualPipe's eight phases (see `dualpipe.eight_phase_program`) with
near = chunk 0 (the way down), far = chunk 1 (the way up), R = pp, k = r (rank pp-1 sits at the turn)
and all M micro-batches in both chunks:

  1. 2(pp-r-1) x F0      2. (r+1) x [F0, F1]      3. (pp-r-1) x [B1, W, F1]
  4. (M-2pp+r+1) x [F0&BW1, F1&BW0]               5. (pp-r-1) x [BW1, F1&BW0]
  6. (r+1) x [B1, B0]    7. (pp-r-1) x [W, B0]    8. (r+1) x W

Constraints: M >= 2*pp. Peak live activations: 2pp+1 (micro-batch, chunk) activations per rank; a chunk
is half a stage of the equivalent pp-stage model, so that is pp + 1/2 stage activations.
"""

from __future__ import annotations

from moeforge.platform.schedules.actions import Schedule
from moeforge.platform.schedules.builder import RankBuilder, add_transfers, require, require_basic
from moeforge.platform.schedules.dualpipe import eight_phase_program


def dualpipev(pp: int, num_microbatches: int) -> Schedule:
    require_basic(pp, num_microbatches)
    m = num_microbatches
    require(m >= 2 * pp, "microbatches", f"DualPipeV needs at least 2*pp = {2 * pp} micro-batches, got {m}")
    lists = []
    for rank in range(pp):
        rb = RankBuilder([range(m), range(m)])
        eight_phase_program(rb, pp, rank, m, lambda phase: 0 if phase == "near" else 1)
        lists.append(rb.actions)
    schedule = Schedule(
        name="dualpipev",
        pp=pp,
        num_microbatches=m,
        chunks_per_rank=2,
        num_stages=2 * pp,
        actions=lists,
        claimed_peak_activations=[2 * pp + 1] * pp,
        param_copies=1,
        layout="v",
    )
    return add_transfers(schedule)
