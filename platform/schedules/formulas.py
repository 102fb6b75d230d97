"""The published bubble / memory comparison (DualPipe README), as functions, with the exact conditions
under which moeforge's simulator reproduces each row.

Definitions used throughout:
  * bubble of rank r = makespan - busy time of rank r (its idle time), all ranks starting at 0, from
    `simulate` with the given costs and comm = 0;
  * F, B, W, F&B = costs.f, costs.b (FULL backward, as in the README), costs.w, costs.fb, per chunk;
  * activations = peak number of (micro-batch, chunk) activations live on a rank, live from the start
    of the forward to the end of the input-gradient backward (memory kept only for a pending W is not
    counted, as in the zero-bubble paper);
  * parameter = parameters held per rank in units of one stage of a PP-stage model.

| schedule  | bubble (formula)          | exact when (besides comm = 0)                      | measured on   |
|-----------|---------------------------|----------------------------------------------------|---------------|
| 1f1b      | (PP-1)(F+B)               | always (any M >= 1)                                | every rank    |
| zb1p      | (PP-1)(F+B-2W)            | M >= PP, W <= F, 2W <= B                           | every rank    |
| dualpipe  | (PP/2-1)(F&B+B-3W)        | F = B-W, W <= F, max(F,B) <= F&B <= F+B, M >= 2PP  | max over ranks (ranks PP/2-1, PP/2) |
| dualpipev | (PP/2-1)(F&B+B-3W), PP=2P | same as dualpipe, with P ranks and PP = 2P stages  | max over ranks |

Activations: 1f1b and zb1p PP on rank 0 (PP-r on rank r, fewer if M < PP-r); dualpipe PP+1 on every
rank; dualpipev 2P+1 chunk activations on every rank, i.e. PP+1 with PP = 2P stages (a chunk of a
2P-stage model is half a stage of the P-stage model, so in stage units that is P + 1/2).
Parameters: 1f1b/zb1p 1x; dualpipe 2x (two stages per rank, each stage on two ranks); dualpipev: 2 chunks
per rank as the table says (2x in units of its own 2P-stage model), which is 1x of the P-stage model's
stage: no stage is replicated (`Schedule.param_copies` = 1).

Outside the stated conditions the formulas are not exact (the simulator may be above or below); with
comm > 0 every schedule's bubble grows with the number of micro-batches.
"""

from __future__ import annotations

from moeforge.platform.schedules.actions import ScheduleError
from moeforge.platform.schedules.simulate import Costs


def table_pp(name: str, pp: int) -> int:
    """The "PP" of the published table for a schedule on `pp` ranks: the number of model stages."""
    return 2 * pp if name == "dualpipev" else pp


def formula_bubble(name: str, pp: int, costs: Costs) -> float:
    """The table's bubble for schedule `name` on `pp` ranks (see the module docstring)."""
    f, b, w, fb = costs.f, costs.b, costs.w, costs.fb
    PP = table_pp(name, pp)
    if name == "1f1b":
        return (PP - 1) * (f + b)
    if name == "zb1p":
        return (PP - 1) * (f + b - 2 * w)
    if name in ("dualpipe", "dualpipev"):
        return (PP / 2 - 1) * (fb + b - 3 * w)
    raise ScheduleError(f"schedule: no published formula for {name!r}")


def formula_activations(name: str, pp: int) -> int:
    """The table's peak activations on rank 0, in (micro-batch, chunk) units."""
    return table_pp(name, pp) + (1 if name in ("dualpipe", "dualpipev") else 0)


def formula_holds(name: str, pp: int, num_microbatches: int, costs: Costs, tol: float = 1e-9) -> bool:
    """Whether (pp, M, costs) satisfy the conditions under which `formula_bubble` is exact."""
    f, b, w, fb = costs.f, costs.b, costs.w, costs.fb
    if costs.comm != 0:
        return False
    if name == "1f1b":
        return True
    if name == "zb1p":
        return num_microbatches >= pp and w <= f + tol and 2 * w <= b + tol
    if name in ("dualpipe", "dualpipev"):
        return abs(f - (b - w)) <= tol and w <= f + tol and max(f, b) - tol <= fb <= f + b + tol
    return False
