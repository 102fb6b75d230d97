"""`moeforge-bench checkpoint` smoke test: the tiny model, 4 steps per mode, through the bench
dispatcher. The report's structure, its bookkeeping against run.dir, and that the sync and async runs
both left complete, readable checkpoints are checked; timings are measured by running the benchmark,
never asserted here."""

from __future__ import annotations

import json
import math

import pytest
from moeforge.jobs.bench import main
from moeforge.platform.bench.checkpoint import run
from moeforge.platform.checkpoint.store import checkpoint_path, list_checkpoints, read_meta

ROW_KEYS = {
    "mode", "ckpt_step_s", "other_step_s", "ckpt_cost_s", "after_ckpt_step_s", "after_ckpt_cost_s", "blocked_s",
    "snapshot_s", "wait_prev_s", "write_s", "checkpoint_bytes", "write_mb_per_s", "per_ckpt_vs_none_s",
    "measured_checkpoints", "train_s", "complete", "async_effective",
}  # fmt: skip


def test_checkpoint_suite_runs_every_mode_and_reports(tmp_path, capsys):
    out, runs_dir = tmp_path / "checkpoint.json", tmp_path / "runs"
    args = ["checkpoint", "model_name=tiny", "precision_name=fp32", "seq_len=16", "global_batch=1", "steps=4",
            "every=2", "warmup=1", "prime_steps=1", "log_every=2", "threads=1", f"run_dir={runs_dir}",
            f"output={out}"]  # fmt: skip
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "checkpoint" and report["storage"] == "local" and report["seq_len"] == 16
    assert report["config"]["model_name"] == "tiny" and report["tokens_per_step"] == 16
    runs = {r["mode"]: r for r in report["runs"]}
    assert list(runs) == ["none", "sync", "async"]
    for mode, r in runs.items():
        records = [json.loads(line) for line in (runs_dir / mode / "metrics.jsonl").read_text().splitlines()]
        assert [s["step"] for s in r["steps"]] == [1, 2, 3, 4] == [rec["step"] for rec in records]
        assert [s["step_time_s"] for s in r["steps"]] == [rec["step_time_s"] for rec in records]
        for s in r["steps"]:
            assert s["time_s"] == pytest.approx(s["step_time_s"] + s["save_s"]) and s["save_s"] >= 0
        assert math.isfinite(r["final_loss"])
    assert runs["none"]["checkpoints"] == [] and runs["none"]["latest"] is None
    assert runs["sync"]["final_loss"] == runs["async"]["final_loss"] == runs["none"]["final_loss"]

    # sync and async both wrote complete checkpoints (every=2 and the last step; keep=2)
    metas = {}
    for mode in ("sync", "async"):
        r, run_dir = runs[mode], str(runs_dir / mode)
        assert r["checkpoint_steps"] == [2, 4] and [s["save_s"] > 0 for s in r["steps"]] == [
            False,
            True,
            False,
            True,
        ]
        assert r["checkpoints"] == [2, 4] == [s for s, _ in list_checkpoints(run_dir)]
        assert r["latest"] == checkpoint_path(run_dir, 4) and r["latest_step"] == 4
        metas[mode] = meta = read_meta(r["latest"])  # COMPLETE present and matching meta.json
        assert meta.step == 4 and meta.world == {"pp": 1, "dp": 1}
        assert r["checkpoint_bytes"] == sum(e["bytes"] for e in meta.shards.values()) > 0
    assert metas["sync"].shards["rank0_0"]["tensors"] == metas["async"].shards["rank0_0"]["tensors"]
    assert runs["sync"]["writer_history"] == []
    # the async run really wrote through the one-process engine's AsyncCheckpointWriter, in the background
    assert runs["async"]["async_writer_used"] is True
    history = runs["async"]["writer_history"]
    assert [(h["step"], h["status"], h["commits"]) for h in history] == [(2, "done", True), (4, "done", True)]
    assert all(h["write_s"] is not None and h["bytes"] > 0 for h in history)

    rows = {row["mode"]: row for row in report["summary"]}
    assert list(rows) == ["none", "sync", "async"] and all(set(row) == ROW_KEYS for row in rows.values())
    assert all(row["complete"] for row in rows.values())
    assert rows["none"]["ckpt_step_s"] is None and rows["none"]["per_ckpt_vs_none_s"] is None
    assert rows["none"]["measured_checkpoints"] == 0 and rows["none"]["async_effective"] is None
    for mode in ("sync", "async"):
        row, steps = rows[mode], {s["step"]: s for s in runs[mode]["steps"]}
        assert row["measured_checkpoints"] == 2  # steps 2 and 4; step 1 is the warm-up
        assert row["ckpt_step_s"] == pytest.approx((steps[2]["time_s"] + steps[4]["time_s"]) / 2)
        assert row["other_step_s"] == pytest.approx(steps[3]["time_s"])
        assert row["after_ckpt_step_s"] == pytest.approx(steps[3]["time_s"])
        assert row["ckpt_cost_s"] == pytest.approx(row["ckpt_step_s"] - row["other_step_s"])
        assert row["blocked_s"] == pytest.approx((steps[2]["save_s"] + steps[4]["save_s"]) / 2)
        assert (
            row["checkpoint_bytes"] == runs[mode]["checkpoint_bytes"]
            and row["per_ckpt_vs_none_s"] is not None
        )
    assert rows["sync"]["write_s"] == pytest.approx(rows["sync"]["blocked_s"])
    assert rows["async"]["async_effective"] is True and rows["sync"]["async_effective"] is None
    assert rows["async"]["snapshot_s"] == pytest.approx(sum(h["snapshot_s"] for h in history) / 2)
    assert rows["async"]["write_s"] == pytest.approx(sum(h["write_s"] for h in history) / 2)

    text = capsys.readouterr().out
    assert "checkpoint: tiny, 4 steps x 1 seq x 16 tok, checkpoint every 2 (keep 2)" in text
    assert "ckpt cost" in text and f"wrote {out}" in text and "async: blocked = snapshot" in text
    assert all(
        line.split()[-1] == "yes"
        for line in text.splitlines()
        if line.split()[:1] in (["none"], ["sync"], ["async"])
    )


def test_a_used_run_dir_is_refused(tmp_path):
    (tmp_path / "sync" / "checkpoints" / "step_00000002").mkdir(parents=True)
    (tmp_path / "sync" / "checkpoints" / "step_00000002" / "COMPLETE").write_text("{}\n")
    with pytest.raises(ValueError, match=r"^run_dir: .*/sync holds checkpoints of an earlier run"):
        run({"model_name": "tiny", "modes": ["sync"], "run_dir": str(tmp_path), "prime_steps": 0})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"every": 1}, r"^bench.checkpoint.every: must be >= 2"),
        (
            {"steps": 3, "every": 2, "warmup": 2},
            r"^bench.checkpoint.warmup: leaves no checkpoint step or no other",
        ),
        ({"steps": 4, "every": 2, "warmup": 4}, r"^bench.checkpoint.warmup: leaves no checkpoint step"),
        ({"modes": ["sync", "lazy"]}, r"^bench.checkpoint.modes: unknown mode 'lazy'"),
        ({"modes": ["none"]}, r"^bench.checkpoint.modes: needs sync and/or async"),
        ({"modes": ["sync", "sync"]}, r"^bench.checkpoint.modes: must not repeat"),
        ({"model_name": "huge"}, r"^bench.checkpoint.model_name: no conf/model/huge.yaml"),
        ({"device": "tpu"}, r"^bench.checkpoint.device: must be one of auto, cpu, cuda"),
        ({"keep": 0}, r"^bench.checkpoint.keep: must be >= 1"),
        ({"stepz": 3}, r"^bench.checkpoint.stepz"),
    ],
)
def test_bad_values_fail_naming_the_key(values, message):
    with pytest.raises(ValueError, match=message):
        run(values)


def test_bad_value_on_the_command_line_is_one_line(capsys):
    assert main(["checkpoint", "every=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moeforge-bench: error: bench.checkpoint.every: must be >= 2") and "\n" not in err
