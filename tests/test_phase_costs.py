"""The overlapped F&B pair's predicted time from phase costs, against closed forms."""

from __future__ import annotations

import json

import pytest
from moeforge.platform.schedules.actions import ScheduleError
from moeforge.platform.schedules.phase_costs import ProgramCosts, overlapped_pair


def v3_like(x: float, y: float) -> ProgramCosts:
    """3 compute phases (attention, experts, combine) with 2 all-to-alls between them."""
    return ProgramCosts((x, x, x), (y, y))


ORDERS = ["backward_first", "forward_first"]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("x, y", [(1.0, 0.0), (1.0, 0.4), (1.0, 1.0), (2.0, 1.5)])
def test_transfers_shorter_than_the_other_compute_are_hidden(x, y, order):
    pair = overlapped_pair(v3_like(x, y), v3_like(x, y), order)
    assert pair.overlapped == pytest.approx(6 * x)  # the compute alone
    assert pair.sequential == pytest.approx(6 * x + 4 * y)
    assert pair.hidden_fraction == pytest.approx(1.0)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("x, y", [(1.0, 1.0), (1.0, 2.0), (0.5, 3.0)])
def test_longer_transfers_serialise_on_the_link(x, y, order):
    # first and last compute phases cannot overlap any transfer; the link carries all four in turn
    pair = overlapped_pair(v3_like(x, y), v3_like(x, y), order)
    assert pair.overlapped == pytest.approx(2 * x + 4 * y)
    assert pair.hidden_fraction == pytest.approx(x / y)


@pytest.mark.parametrize(
    "order, overlapped, hidden",
    [
        ("forward_first", 6.5, 0.0),  # f0 [0,1]; b0 [1,3], transfer [3,3.5]; b1 [3.5,6.5]
        ("backward_first", 6.0, 1.0),  # b0 [0,2], transfer [2,2.5]; f0 [2,3]; b1 [3,6]
    ],
)
def test_no_transfers_and_uneven_programs(order, overlapped, hidden):
    pair = overlapped_pair(ProgramCosts((1.0,)), ProgramCosts((2.0, 3.0), (0.5,)), order)
    assert pair.overlapped == pytest.approx(overlapped)
    assert pair.sequential == pytest.approx(6.5)
    assert pair.hidden_fraction == pytest.approx(hidden)


@pytest.mark.parametrize("order, overlapped", [("backward_first", 18.0), ("forward_first", 20.0)])
def test_a_short_closing_phase_is_hidden_only_backward_first(order, overlapped):
    """Chunks ending in a short phase (attention 4, experts 4, tail 1; all-to-alls 2).
    backward first: b.tail [0,1] (its transfer [1,3]), f.attn [1,5] ([5,7]), b.experts [5,9]
    ([9,11]), f.experts [9,13] ([13,15]), b.attn [13,17], f.tail [17,18]: the compute alone.
    forward first: f.attn [0,4] ([4,6]), b.tail [4,5] (queued: [6,8]), f.experts [6,10] ([10,12]),
    b.experts [10,14] ([14,16]), f.tail [14,15], b.attn waits until 16 -> 20: 2 of 8 exposed."""
    forward, backward = ProgramCosts((4, 4, 1), (2, 2)), ProgramCosts((1, 4, 4), (2, 2))
    pair = overlapped_pair(forward, backward, order)
    assert pair.compute == pytest.approx(18.0)
    assert pair.overlapped == pytest.approx(overlapped)
    assert pair.hidden_fraction == pytest.approx(1.0 if order == "backward_first" else 0.75)


def test_unknown_pair_order():
    with pytest.raises(ScheduleError, match="order must be backward_first or forward_first"):
        overlapped_pair(v3_like(1, 1), v3_like(1, 1), "sideways")


def test_bad_phase_costs():
    with pytest.raises(ScheduleError, match="3 compute phases need 2 transfers"):
        ProgramCosts((1.0, 1.0, 1.0), (1.0,))
    with pytest.raises(ScheduleError, match="must be >= 0"):
        ProgramCosts((1.0, -1.0), (0.0,))


PHASES = "phases={forward:[1,1,1],forward_transfers:[0.8,0.8],backward:[2,2,2],backward_transfers:[0.8,0.8]}"


def test_schedule_job_predicts_the_gain_of_overlap(tmp_path, capsys):
    from moeforge.jobs.schedule import main
    from moeforge.platform.schedules import build_schedule
    from moeforge.platform.schedules.simulate import Costs, simulate

    argv = ["schedule=dualpipe", "pp=4", "microbatches=8", "plot=false", f"out_dir={tmp_path}", "format=json"]
    assert main([*argv, PHASES]) == 0
    report = json.loads(capsys.readouterr().out)
    overlap = report["overlap"]
    forward, backward = ProgramCosts((1, 1, 1), (0.8, 0.8)), ProgramCosts((2, 2, 2), (0.8, 0.8))
    pair = overlapped_pair(forward, backward)
    assert overlap["pair_overlapped"] == pytest.approx(pair.overlapped) == pytest.approx(9.0)  # all hidden
    assert overlap["pair_sequential"] == pytest.approx(12.2)
    schedule = build_schedule("dualpipe", 4, 8)
    on = simulate(schedule, Costs(f=4.6, b=7.6, w=1.0, fb=pair.overlapped))
    off = simulate(schedule, Costs(f=4.6, b=7.6, w=1.0, fb=12.2))
    assert overlap["makespan_overlapped"] == pytest.approx(on.makespan) == pytest.approx(report["makespan"])
    assert overlap["makespan_sequential"] == pytest.approx(off.makespan)
    assert off.makespan > on.makespan


def test_schedule_job_refuses_bad_phases(tmp_path, capsys):
    from moeforge.jobs.schedule import main

    bad = "phases={forward:[1,1],forward_transfers:[],backward:[1],backward_transfers:[]}"
    assert main(["plot=false", f"out_dir={tmp_path}", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 compute phases need 1 transfers" in err[0], err
