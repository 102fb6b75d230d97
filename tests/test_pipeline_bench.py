"""moeforge-bench pipeline on a tiny setting: it runs end to end, writes its JSON, and its synthetic
part (the real executor with every F / B / W sleeping a set time) runs what the simulator simulates
for the same action lists: on every rank the same compute actions in the same order, and every send
and receive of the lists completed. The simulated figures are the schedules' known bubbles. No
timing is asserted: the measured figures follow the machine's load, so they are reported (and
checked to be there), never held to a window or a ranking.
"""

from __future__ import annotations

import json
import math

import pytest
from moeforge.jobs.bench import main as bench_main
from moeforge.platform.schedules import Costs, build_schedule, simulate
from moeforge.platform.schedules.actions import Kind

SCHEDULES = ["1f1b", "zb1p", "dualpipe", "dualpipev"]
PP, MICROBATCHES = 2, 4
# Simulated bubbles (pp=2, M=4, f/b/w = 30/60/30 ms): 1F1B's (pp-1)/(M+pp-1) = 1/5, ZB1P's and
# DualPipeV's 1/13, none for DualPipe.
SIMULATED_BUBBLES = {"1f1b": 1 / 5, "zb1p": 1 / 13, "dualpipe": 0.0, "dualpipev": 1 / 13}
SENDS, RECEIVES = (Kind.SEND_F, Kind.SEND_B), (Kind.RECV_F, Kind.RECV_B)


def test_pipeline_bench_runs_what_the_simulator_simulates(tmp_path, capsys):
    out = tmp_path / "pipeline.json"
    status = bench_main(
        [
            "pipeline",
            f"pps=[{PP}]",
            f"schedules=[{','.join(SCHEDULES)}]",
            f"microbatches_per_rank={MICROBATCHES // PP}",
            "f_ms=30",
            "b_ms=60",
            "w_ms=30",
            "steps=3",  # the first is warm-up
            "real=[[dualpipe,2]]",
            "real_microbatches=4",
            "real_global_batch=4",
            "real_steps=2",
            f"output={out}",
        ]
    )
    assert status == 0
    report = json.loads(out.read_text())
    rows = {r["schedule"]: r for r in report["synthetic"]}
    assert [(r["schedule"], r["pp"], r["microbatches"]) for r in report["synthetic"]] == [
        (name, PP, MICROBATCHES) for name in SCHEDULES
    ]
    for name, row in rows.items():
        schedule = build_schedule(name, PP, MICROBATCHES)
        sim = simulate(schedule, Costs())
        assert row["simulated_bubble"] == pytest.approx(SIMULATED_BUBBLES[name], abs=1e-12), name
        for rank in range(PP):
            # the executor ran the simulator's compute actions in its order ...
            simulated = [rec.label for rec in sim.records() if rec.rank == rank]
            assert row["ran"][rank] == simulated, (name, rank)
            # ... and completed every transfer of the rank's list, each direction in list order
            actions = schedule.actions[rank]
            assert row["sent"][rank] == [str(a) for a in actions if a.kind in SENDS], (name, rank)
            assert row["received"][rank] == [str(a) for a in actions if a.kind in RECEIVES], (name, rank)
        # the measured figures are reported (their values are the machine's, not asserted)
        assert math.isfinite(row["measured_step_s"]) and row["measured_step_s"] > 0, row
        assert 0.0 <= row["measured_bubble"] < 1.0, row
    ranking = report["rankings"][str(PP)]["simulated"]
    assert sorted(ranking) == sorted(SCHEDULES) and (ranking[0], ranking[-1]) == ("dualpipe", "1f1b")
    (real,) = report["real"]
    assert real["schedule"] == "dualpipe" and real["pp"] == 2 and math.isfinite(real["final_loss"])
    assert real["tokens_per_s"] > 0 and real["single_tokens_per_s"] > 0
    assert "measured s" in capsys.readouterr().out


def test_pipeline_bench_bad_value_names_the_field(capsys):
    assert bench_main(["pipeline", "w_ms=99"]) == 2
    assert "w_ms" in capsys.readouterr().err
