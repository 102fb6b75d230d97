"""`moeforge-bench convergence` smoke test: 3 steps per precision through the bench dispatcher (the
figure itself is measured by running the benchmark, never asserted here)."""

from __future__ import annotations

import json

import pytest
from moeforge.jobs.bench import main
from moeforge.model.config import ConfigError
from moeforge.platform.bench.convergence import run


def test_convergence_suite_trains_each_precision_and_compares(tmp_path, capsys):
    out = tmp_path / "convergence.json"
    args = ["convergence", "steps=3", "window=2", "seq_len=32", "log_every=3", "eval_batches=1",
            f"output={out}", f"run_dir={tmp_path / 'runs'}"]
    assert main(args) == 0
    report = json.loads(out.read_text())
    bf16, fp8 = report["runs"]
    assert (bf16["precision"], fp8["precision"], report["baseline"]) == ("bf16", "fp8", "bf16")
    for r in (bf16, fp8):
        assert len(r["losses"]) == 3 and r["final_loss"] == pytest.approx(sum(r["losses"][-2:]) / 2)
        records = (tmp_path / "runs" / r["precision"] / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["loss"] for line in records] == r["losses"]
    assert fp8["final_loss_rel_diff"] == pytest.approx((fp8["final_loss"] - bf16["final_loss"]) / bf16["final_loss"])
    assert bf16["final_loss_rel_diff"] == 0.0
    assert fp8["first_loss"] == pytest.approx(bf16["first_loss"], rel=1e-2)  # same init and data
    assert fp8["losses"] != bf16["losses"]  # the two policies really computed differently
    text = capsys.readouterr().out
    assert "vs bf16" in text and "fp8 vs bf16: final loss" in text


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match=r"^bench.convergence.window: must lie in \[1, steps=3\]"):
        run({"steps": 3, "window": 5})
    with pytest.raises(ConfigError, match=r"^bench.convergence.precisions: no conf/precision/fp4.yaml"):
        run({"precisions": ["bf16", "fp4"]})
