"""moeforge-train as a user runs it: the installed console script, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

TRAIN = os.path.join(os.path.dirname(sys.executable), "moeforge-train")


def run_train(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        [TRAIN, *args], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_bad_config_exits_2_naming_the_field(tmp_path):
    proc = run_train(["parallel.pp=0", f"run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip() == "moeforge-train: config error: parallel.pp: must be >= 1, got 0"
    assert not (tmp_path / "run").exists()  # validation comes before any work


def test_cross_section_error_names_both_fields(tmp_path):
    proc = run_train(["parallel.microbatches=3", "data.global_batch=8"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "data.global_batch" in proc.stderr and "parallel.microbatches" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_tiny_run_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(["model=tiny", "run.steps=5", "run.log_every=1", f"run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    progress = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == [f"{i}/5" for i in range(1, 6)]
    assert "done: 5 steps" in proc.stdout

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert all(r["tokens"] == 8 * 128 for r in records)  # tiny: global_batch 8 x seq_len 128
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["final_loss"] == records[-1]["loss"]
    assert (run_dir / "config.yaml").read_text().count("hidden_size: 128") == 1
    # Hydra wrote nothing of its own and did not change directory.
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_missing_data_path_fails_before_any_work(tmp_path):
    missing = tmp_path / "no-such-tokens.bin"
    proc = run_train(
        ["data.source=tokens", f"+data.path={missing}", f"run.dir={tmp_path / 'run'}"], cwd=tmp_path
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"moeforge-train: config error: data.path: {missing} does not exist "
        "(prepare token shards with moeforge-prepare)"
    )
    assert not (tmp_path / "run").exists()
