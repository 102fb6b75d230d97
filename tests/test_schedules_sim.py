"""The simulator against hand-computed timelines and the published DualPipe comparison table."""

import itertools

import pytest
from moeforge.platform.schedules import Costs, ScheduleError, build_schedule, simulate
from moeforge.platform.schedules.formulas import formula_activations, formula_bubble, formula_holds
from moeforge.platform.schedules.io import parse_schedule


def test_hand_computed_1f1b():
    """pp=2, M=2, F=1, B(full)=2: rank 1 runs F0 [1,2] BW0 [2,4] F1 [4,5] BW1 [5,7]; rank 0 runs F0 [0,1]
    F1 [1,2], waits, BW0 [4,6], waits, BW1 [7,9]."""
    r = simulate(build_schedule("1f1b", 2, 2), Costs(f=1, b=2, w=1))
    spans = {(s.rank, str(s.action)): (s.start, s.end) for s in r.spans if s.action.kind.is_compute}
    assert spans[1, "BW0.0"] == (2, 4) and spans[1, "F0.1"] == (4, 5)
    assert spans[0, "BW0.0"] == (4, 6) and spans[0, "BW0.1"] == (7, 9)
    assert r.makespan == 9 and r.busy == [6, 6] and r.idle == [3, 3]


def test_comm_latency_delays_inputs():
    text = "transfers: auto\nrank 0: F0.0 BW0.0\nrank 1: F0.0 BW0.0\n"
    s = parse_schedule(text)
    fast = simulate(s, Costs(f=1, b=2, w=1))
    slow = simulate(s, Costs(f=1, b=2, w=1, comm=0.5))
    assert fast.makespan == 6 and slow.makespan == 7  # two transfers of 0.5 each on the critical path


def test_overlapped_pair_costs_fb():
    r = simulate(build_schedule("dualpipe", 2, 4), Costs(f=1, b=2, w=1, fb=2.25))
    fb = [s for s in r.spans if s.action.kind.value == "FB"]
    assert fb and all(s.end - s.start == 2.25 for s in fb)  # full-backward halves: F&B = fb


def test_bad_costs_rejected():
    with pytest.raises(ScheduleError, match="cost.w"):
        Costs(f=1, b=1, w=2)
    with pytest.raises(ScheduleError, match="cost.f"):
        Costs(f=-1)


COSTS_1F1B = [Costs(f, bi + w, w) for f, bi, w in itertools.product((0.5, 1, 2), (0.5, 1, 2), (0, 0.5, 1))]


@pytest.mark.parametrize("pp", [2, 4, 8])
@pytest.mark.parametrize("name", ["1f1b", "zb1p"])
def test_linear_schedules_match_the_table(name, pp):
    """Bubble = makespan - busy of EVERY rank = the formula, whenever `formula_holds` (1f1b: always;
    zb1p: M >= PP, W <= F, 2W <= B). Peak activations: PP on rank 0 (PP - r on rank r), 1x parameters."""
    checked = 0
    for m in sorted({1, pp - 1, pp, pp + 1, 2 * pp, 3 * pp + 1} - {0}):
        s = build_schedule(name, pp, m)
        for costs in COSTS_1F1B:
            r = simulate(s, costs)
            if formula_holds(name, pp, m, costs):
                assert r.idle == pytest.approx([formula_bubble(name, pp, costs)] * pp), (m, costs)
                checked += 1
        assert r.peak_activations == [min(pp - rank, m) for rank in range(pp)]
        if m >= pp:
            assert r.peak_activations[0] == formula_activations(name, pp) == pp
        assert r.param_copies == 1 and r.param_memory == 1
    assert checked >= 60


def dual_costs():
    """Costs with F = B - W (forward = input-gradient backward), W <= F, F&B in [max(F, B), F + B]."""
    for f, w in itertools.product((0.5, 1, 2), (0, 0.5, 1)):
        if w > f:
            continue
        b = f + w
        for fb in sorted({max(f, b), (max(f, b) + f + b) / 2, f + b}):
            yield Costs(f, b, w, fb)


@pytest.mark.parametrize("pp", [2, 4, 8])
@pytest.mark.parametrize("name", ["dualpipe", "dualpipev"])
def test_dual_schedules_match_the_table(name, pp):
    """max over ranks of (makespan - busy) = (PP/2-1)(F&B+B-3W) where PP = pp for DualPipe and the number
    of stages 2*pp for DualPipeV; peak activations PP+1 (micro-batch, chunk) activations on every rank;
    parameters 2x for DualPipe (each stage on two ranks), 1x for DualPipeV."""
    PP = pp if name == "dualpipe" else 2 * pp
    for m in (2 * pp, 2 * pp + 2, 20 if pp < 8 else 4 * pp):
        s = build_schedule(name, pp, m)
        for costs in dual_costs():
            assert formula_holds(name, pp, m, costs)
            r = simulate(s, costs)
            assert max(r.idle) == pytest.approx((PP / 2 - 1) * (costs.fb + costs.b - 3 * costs.w)), (m, costs)
            assert max(r.idle) == pytest.approx(formula_bubble(name, pp, costs))
        assert r.peak_activations == [PP + 1] * pp == [formula_activations(name, pp)] * pp
        assert r.param_copies == (2 if name == "dualpipe" else 1)
        assert r.param_memory == (2 if name == "dualpipe" else 1)


def test_dualpipe_bubble_sits_on_the_middle_ranks():
    r = simulate(build_schedule("dualpipe", 8, 20), Costs(f=1, b=2, w=1, fb=2.5))
    assert r.idle[3] == r.idle[4] == max(r.idle) == pytest.approx(3 * (2.5 + 2 - 3))
    assert r.idle[0] < r.idle[3]


def test_dualpipev_is_dualpipe_on_twice_the_ranks():
    """DualPipeV on P ranks has the bubble of DualPipe on 2P ranks (it is DualPipe cut in half)."""
    for costs in (Costs(1, 2, 1, 2.5), Costs(1, 3, 1, 3), Costs(1, 2, 0.5, 2.5)):
        v = simulate(build_schedule("dualpipev", 2, 8), costs)
        d = simulate(build_schedule("dualpipe", 4, 16), costs)
        assert max(v.idle) == pytest.approx(max(d.idle))


def test_conditions_are_needed():
    """Outside the stated conditions the formulas are not exact: `formula_holds` says so."""
    zb = Costs(f=0.5, b=3, w=1)  # W > F
    r = simulate(build_schedule("zb1p", 4, 8), zb)
    assert not formula_holds("zb1p", 4, 8, zb) and max(r.idle) != pytest.approx(formula_bubble("zb1p", 4, zb))
    dp = Costs(f=1, b=3, w=1, fb=3)  # F != B - W
    r = simulate(build_schedule("dualpipe", 4, 8), dp)
    assert not formula_holds("dualpipe", 4, 8, dp)
    assert max(r.idle) != pytest.approx(formula_bubble("dualpipe", 4, dp))


def test_dualpipe_beats_1f1b_and_zb1p_at_equal_costs():
    costs = Costs(f=1, b=2, w=1, fb=2.5)
    makespan = {n: simulate(build_schedule(n, 8, 20), costs).makespan for n in ("1f1b", "zb1p", "dualpipe")}
    assert makespan["dualpipe"] < makespan["zb1p"] < makespan["1f1b"]
