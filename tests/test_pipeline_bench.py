"""moeforge-bench pipeline on a tiny setting: it runs end to end and its JSON has the fields (no timing
asserts: the figures depend on the machine)."""

from __future__ import annotations

import json

from moeforge.jobs.bench import main as bench_main


def test_pipeline_bench_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "pipeline.json"
    status = bench_main(
        [
            "pipeline",
            "pps=[2]",
            "schedules=[1f1b,dualpipe]",
            "microbatches_per_rank=2",
            "f_ms=2",
            "b_ms=4",
            "w_ms=2",
            "steps=2",
            "real=[[dualpipe,2]]",
            "real_microbatches=4",
            "real_global_batch=4",
            "real_steps=2",
            f"output={out}",
        ]
    )
    assert status == 0
    report = json.loads(out.read_text())
    assert [(r["schedule"], r["pp"], r["microbatches"]) for r in report["synthetic"]] == [
        ("1f1b", 2, 4),
        ("dualpipe", 2, 4),
    ]
    for row in report["synthetic"]:
        for key in (
            "simulated_makespan_s",
            "measured_step_s",
            "ratio",
            "simulated_bubble",
            "measured_bubble",
        ):
            assert row[key] >= 0, key
        assert row["measured_step_s"] > 0 and row["simulated_makespan_s"] > 0
    assert {"simulated", "measured", "same", "consistent"} <= set(report["rankings"]["2"])
    assert sorted(report["rankings"]["2"]["simulated"]) == ["1f1b", "dualpipe"]
    (real,) = report["real"]
    assert real["schedule"] == "dualpipe" and real["pp"] == 2
    assert real["tokens_per_s"] > 0 and real["single_tokens_per_s"] > 0
    assert "measured s" in capsys.readouterr().out


def test_pipeline_bench_bad_value_names_the_field(capsys):
    assert bench_main(["pipeline", "w_ms=99"]) == 2
    assert "w_ms" in capsys.readouterr().err
