"""DualPipe (DeepSeek-V3 report, section 3.2.1): a bidirectional pipeline with two chunks per rank.

Layout: rank r holds stage r (chunk 0) and stage pp-1-r (chunk 1) of a pp-stage model. The first half
of the micro-batches (0..M/2-1) enters at rank 0 and flows through chunk 0; the second half (M/2..M-1)
enters at rank pp-1 and flows through chunk 1 in the opposite direction. Each rank thus overlaps the
forward of one direction with the backward of the other ("F&B").

Each rank runs the same eight-phase program from its own point of view. Two names make it symmetric:
  * "near"/"far" phases instead of chunks: the near phase is the direction whose micro-batches enter at
    this rank's end of the pipeline (chunk 0 on ranks 0..pp/2-1, chunk 1 on ranks pp/2..pp-1);
  * k = min(r, pp-1-r), the rank's distance from its end, and R = pp/2 ranks per half.
With N = M/2 micro-batches per direction, the phases are:

  1. warm-up:            2(R-k-1) forwards of the near phase
  2. fill both:          (k+1) x [F near, F far]
  3. zero-bubble far:    (R-k-1) x [B far (split), W, F far]
  4. main overlap:       (N-2R+k+1) x [F near & BW far, F far & BW near]
                         (the middle ranks, k = R-1, run the first pair unoverlapped: F near, BW far)
  5. drain far:          (R-k-1) x [BW far, F far & BW near]
  6. backwards both:     (k+1) x [B far, B near]; from the middle iteration on the backwards are split
                         (ZB) so their Ws can fill the cool-down
  7. zero-bubble near:   (R-k-1) x [W, B near (split)]
  8. cool-down:          (k+1) x W

The same program with R = pp, k = r, N = M and near = chunk 0 gives DualPipeV (see `dualpipev.dualpipev`).

Constraints (as in DualPipe): pp even, M even and M >= 2*pp, so that phase 4 runs at least once.
Peak live activations: pp+1 (micro-batch, chunk) activations on every rank (pp after phase 2, one more
when phase 4 starts its first forward before a backward frees one).
"""

from __future__ import annotations

from collections.abc import Callable

from moeforge.platform.schedules.actions import Schedule, ScheduleError
from moeforge.platform.schedules.builder import RankBuilder, add_transfers, require, require_basic


def eight_phase_program(rb: RankBuilder, R: int, k: int, N: int, chunk: Callable[[str], int]) -> None:
    """Append the DualPipe eight-phase program for one rank to `rb` (see the module docstring).
    `chunk("near")` / `chunk("far")` map the two phases to this rank's local chunks."""
    near, far = chunk("near"), chunk("far")
    at_turn = k == R - 1  # the ranks where the two directions meet (DualPipe) / turn (DualPipeV)

    # Phase 1: warm-up forwards of the near direction.
    for _ in range(2 * (R - k - 1)):
        rb.forward(near)

    # Phase 2: forwards of both directions.
    for _ in range(k + 1):
        rb.forward(near)
        rb.forward(far)

    # Phase 3: far direction, zero-bubble: its first backwards are split and W runs right away.
    for _ in range(R - k - 1):
        rb.backward(far, split=True)
        rb.weight()
        rb.forward(far)

    # Phase 4 (main): overlapped forward of one direction with the full backward of the other.
    for i in range(N - 2 * R + k + 1):
        if i == 0 and at_turn:
            # Not overlapped (as in DualPipe): the near forward's output leaves for the other side
            # of the turn before the backward runs, instead of after the whole pair.
            rb.forward(near)
            rb.backward(far)
        else:
            rb.forward_backward(near, far)
        rb.forward_backward(far, near)

    # Phase 5: the near forwards are done; drain far backwards, overlapped where a far forward remains.
    for _ in range(R - k - 1):
        rb.backward(far)
        rb.forward_backward(far, near)

    # Phase 6: backwards of both directions; the second half of them is split (zero bubble).
    steps = k + 1
    split = False
    for i in range(steps):
        if i == steps // 2 and k % 2 == 1:
            split = True
        rb.backward(far, split=split)
        if i == steps // 2 and k % 2 == 0:
            split = True
        rb.backward(near, split=split)

    # Phase 7: near backwards, split, with the pending Ws interleaved.
    for _ in range(R - k - 1):
        rb.weight()
        rb.backward(near, split=True)

    # Phase 8: cool-down, the remaining weight gradients.
    for _ in range(k + 1):
        rb.weight()
    if rb.pending_w:
        raise ScheduleError(f"generator bug: {len(rb.pending_w)} W left after phase 8")


def dualpipe(pp: int, num_microbatches: int) -> Schedule:
    require_basic(pp, num_microbatches)
    require(pp % 2 == 0, "pp", f"DualPipe needs an even number of pipeline ranks, got {pp}")
    m = num_microbatches
    require(m % 2 == 0, "microbatches", f"DualPipe needs an even number of micro-batches, got {m}")
    require(m >= 2 * pp, "microbatches", f"DualPipe needs at least 2*pp = {2 * pp} micro-batches, got {m}")
    half = m // 2
    lists = []
    for rank in range(pp):
        # The near direction enters at this rank's end: chunk 0 on the first half, chunk 1 on the second.
        near = 0 if rank < pp // 2 else 1
        rb = RankBuilder([range(half), range(half, m)])
        k = min(rank, pp - 1 - rank)
        eight_phase_program(
            rb, pp // 2, k, half, lambda phase, near=near: near if phase == "near" else 1 - near
        )
        lists.append(rb.actions)
    schedule = Schedule(
        name="dualpipe",
        pp=pp,
        num_microbatches=m,
        chunks_per_rank=2,
        num_stages=pp,
        actions=lists,
        claimed_peak_activations=[pp + 1] * pp,
        param_copies=2,
        layout="bidirectional",
    )
    return add_transfers(schedule)
