"""`moeforge-bench overlap` on tiny sizes: synthetic phase programs (sleeps, real gloo all-to-alls)
through the real executor, with overlap off and in both pair orders, beside torch's
ScheduleDualPipeV on the same costs. Asserts what the run did (actions, all-to-alls per pair,
the simulator's figure from the measured all-to-all time, the files), never a timing."""

from __future__ import annotations

import json

import pytest
from moeforge.jobs.bench import main as bench_main
from moeforge.platform.bench.overlap import OverlapBenchConfig
from moeforge.platform.bench.overlap_phases import PhaseShape
from moeforge.platform.schedules import Kind, build_schedule, simulate
from moeforge.platform.schedules.phase_costs import pair_costs

TINY = [
    "pps=[2]",
    "attn_ms=1.0",
    "experts_ms=1.0",
    "tail_ms=0.5",
    "a2a_ms=0.5",
    "act_numel=64",
    "steps=2",
    "real=false",
]


def test_overlap_bench_runs_every_case_and_the_torch_peer(tmp_path, capsys):
    out = tmp_path / "overlap.json"
    assert bench_main(["overlap", *TINY, f"output={out}"]) == 0
    text = capsys.readouterr().out
    assert "torch ScheduleDualPipeV" in text and f"wrote {out}" in text

    report = json.loads(out.read_text())
    cfg = OverlapBenchConfig.from_dict(report["config"])
    rows = report["synthetic"]
    assert [(r["schedule"], r["order"]) for r in rows] == [
        (s, o) for s in ("dualpipe", "dualpipev") for o in (None, "backward_first", "forward_first")
    ]
    (peer,) = report["torch"]
    assert peer["pp"] == 2 and peer["step_s"] > 0
    for r in rows:
        schedule = build_schedule(r["schedule"], 2, r["microbatches"])
        layers = cfg.layers_per_stage // (schedule.num_stages // 2)
        pairs = [sum(a.kind is Kind.FB for a in schedule.actions[q]) for q in range(2)]
        # every rank of a pipeline rank's EP group ran that rank's list: its F&B pairs, each with
        # the 2 all-to-alls per layer of its forward and of its backward on the timeline
        assert r["pairs_per_rank"] == pytest.approx(sum(pairs) / 2)
        assert r["a2a_per_pair"] == pytest.approx(4 * layers)
        # the prediction beside it is the simulator's, from the phases and the measured a2a time
        shape = cfg.shape(schedule.num_stages // 2)
        assert isinstance(shape, PhaseShape) and shape.layers == layers
        forward, backward = shape.programs(r["a2a_ms"] / 1e3)
        costs = pair_costs(forward, backward, shape.w_s, r["overlap"], order=r["order"] or "backward_first")
        assert r["simulated_s"] == pytest.approx(simulate(schedule, costs).makespan)
        assert r["ratio_vs_torch"] == pytest.approx(r["step_s"] / peer["step_s"])
        assert r["hidden_fraction"] <= 1.0 and r["a2a_ms"] > 0
        assert (tmp_path / r["timeline"].rpartition("/")[2]).stat().st_size > 0


@pytest.mark.parametrize(
    "override, field",
    [
        ("schedules=[1f1b]", "schedules"),
        ("layers_per_stage=3", "layers_per_stage"),
        ("orders=[up]", "orders"),
    ],
)
def test_overlap_bench_refuses_bad_values(tmp_path, capsys, override, field):
    assert bench_main(["overlap", override, f"output={tmp_path / 'x.json'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0], err
    assert not (tmp_path / "x.json").exists()
