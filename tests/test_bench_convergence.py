"""`moeforge-bench convergence` smoke test: 3 steps per precision and seed, 2 seeds, through the bench
dispatcher. The report's structure and its across-seed statistics are checked against the per-seed
values; the figure itself is measured by running the benchmark, never asserted here."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from moeforge.jobs.bench import main
from moeforge.platform.bench.convergence import BOUND, run, spread
from moeforge.platform.config.builder import ConfigError

SEEDS = [11, 12]


def test_convergence_suite_trains_each_seed_and_precision_and_summarizes(tmp_path, capsys):
    out = tmp_path / "convergence.json"
    args = ["convergence", "steps=3", "window=2", "seq_len=32", "log_every=3", "eval_batches=1",
            f"seeds=[{SEEDS[0]},{SEEDS[1]}]", f"output={out}", f"run_dir={tmp_path / 'runs'}"]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert (report["baseline"], report["seeds"], report["bound"]) == ("bf16", SEEDS, BOUND)
    runs = report["runs"]
    assert [(r["seed"], r["precision"]) for r in runs] == [(s, p) for s in SEEDS for p in ("bf16", "fp8")]
    by = {(r["seed"], r["precision"]): r for r in runs}
    for r in runs:
        assert len(r["losses"]) == 3 and r["final_loss"] == pytest.approx(sum(r["losses"][-2:]) / 2)
        assert all(math.isfinite(x) for x in r["losses"]) and r["losses"][-1] < r["losses"][0]
        records = (tmp_path / "runs" / str(r["seed"]) / r["precision"] / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["loss"] for line in records] == r["losses"]
    rel = []
    for seed in SEEDS:
        bf16, fp8 = by[seed, "bf16"], by[seed, "fp8"]
        assert bf16["final_loss_rel_diff"] == 0.0
        assert fp8["final_loss_rel_diff"] == pytest.approx((fp8["final_loss"] - bf16["final_loss"]) / bf16["final_loss"])
        assert fp8["first_loss"] == pytest.approx(bf16["first_loss"], rel=1e-2)  # same init and data per seed
        assert fp8["losses"] != bf16["losses"]  # the two policies really computed differently
        rel.append(fp8["final_loss_rel_diff"])
    assert by[SEEDS[0], "bf16"]["losses"] != by[SEEDS[1], "bf16"]["losses"]  # the seeds differ

    (row,) = report["summary"]
    final = row["final_loss_rel_diff"]
    assert row["precision"] == "fp8" and row["seeds"] == SEEDS and final["n"] == 2
    assert final["per_seed"] == rel
    assert final["mean"] == pytest.approx(statistics.mean(rel))
    assert final["std"] == pytest.approx(statistics.stdev(rel))
    assert (final["min"], final["max"]) == (min(rel), max(rel))
    assert final["max_abs"] == max(abs(v) for v in rel)
    assert final["mean_within_bound"] == (abs(statistics.mean(rel)) <= BOUND)
    assert final["max_within_bound"] == (max(abs(v) for v in rel) <= BOUND)
    assert row["within_bound"] == (final["mean_within_bound"] and final["max_within_bound"])
    evals = [by[seed, "fp8"]["eval_loss_rel_diff"] for seed in SEEDS]
    assert row["eval_loss_rel_diff"]["per_seed"] == evals
    assert row["eval_loss_rel_diff"]["mean"] == pytest.approx(statistics.mean(evals))

    text = capsys.readouterr().out
    assert f"seeds {SEEDS[0]}, {SEEDS[1]}" in text and "vs bf16" in text and "|mean|<=0.250%" in text
    assert f"{100 * final['mean']:+.3f}%" in text and f"{100 * final['std']:.3f}%" in text
    assert "fp8 vs bf16: final loss mean" in text and "over 2 seed(s)" in text


def test_spread_of_one_seed_has_no_std_and_missing_values_give_none():
    one = spread([0.001])
    assert (one["mean"], one["std"], one["max_abs"], one["mean_within_bound"]) == (0.001, None, 0.001, True)
    assert spread([-0.003, 0.001])["max_within_bound"] is False
    assert spread([0.001, None])["mean"] is None


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match=r"^bench.convergence.window: must lie in \[1, steps=3\]"):
        run({"steps": 3, "window": 5})
    with pytest.raises(ConfigError, match=r"^bench.convergence.precisions: no conf/precision/fp4.yaml"):
        run({"precisions": ["bf16", "fp4"]})
    with pytest.raises(ConfigError, match=r"^bench.convergence.seeds: must not repeat"):
        run({"seeds": [1, 1]})
    with pytest.raises(ConfigError, match=r"^bench.convergence.seeds: needs at least one"):
        run({"seeds": []})
