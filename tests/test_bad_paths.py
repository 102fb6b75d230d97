"""An output a job cannot write is refused before any work: one line naming the setting, exit 2.

The check itself (`check_local_output`) on each kind of bad location, then each job that writes
local files, through its installed console script: moeforge-train (one process, and a pipeline,
refused before Ray starts), moeforge-schedule and moeforge-generate.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from moeforge.platform.config.builder import ConfigError
from moeforge.platform.outputs.storage import check_local_output

BIN = os.path.dirname(sys.executable)


def test_each_kind_of_unwritable_location_is_named(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    check_local_output(str(tmp_path / "new" / "deeper"), "run.dir", directory=True)  # creatable
    check_local_output(str(tmp_path / "out.jsonl"), "out", directory=False)
    check_local_output("s3://bucket/run", "run.dir", directory=True)  # checked where S3 is opened
    cases = [
        (a_file, True, f"run.dir: {a_file} is a file, not a directory"),
        (tmp_path, False, f"out: {tmp_path} is a directory; give a file name"),
        (a_file / "run", True, f"run.dir: {a_file / 'run'} cannot be created: {a_file} is a file"),
        (a_file / "a" / "b.jsonl", False, f"out: {a_file / 'a' / 'b.jsonl'} cannot be created: {a_file} is a file"),
    ]
    for path, directory, message in cases:
        field = "run.dir" if directory else "out"
        with pytest.raises(ConfigError) as err:
            check_local_output(str(path), field, directory=directory)
        assert str(err.value) == message


def _refused(tmp_path, prog: str, *args: str) -> str:
    """Run a console script that must refuse; return its one line."""
    env = {**os.environ, "RAY_ADDRESS": "", "OMP_NUM_THREADS": "1"}
    command = [os.path.join(BIN, prog), *args]
    proc = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output[-3000:]
    return lines[0]


@pytest.mark.parametrize("experiment", ["tiny_cpu_single", "tiny_cpu_dualpipe"])
def test_train_refuses_a_run_dir_under_a_file(tmp_path, experiment):
    a_file = tmp_path / "runs"
    a_file.write_text("not a directory")
    line = _refused(tmp_path, "moeforge-train", f"experiment={experiment}", f"run.dir={a_file / 'exp'}")
    assert line == f"moeforge-train: config error: run.dir: {a_file / 'exp'} cannot be created: {a_file} is a file"
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "ray").exists()  # no Hydra, no Ray


def test_schedule_and_generate_refuse_an_output_under_a_file(tmp_path):
    """(moeforge-convert's `out` under a file is among tests/test_hf_export.py's bad inputs.)"""
    a_file = tmp_path / "exports"
    a_file.write_text("not a directory")
    line = _refused(tmp_path, "moeforge-schedule", f"out_dir={a_file / 'schedule'}")
    assert line.endswith(f"out_dir: {a_file / 'schedule'} cannot be created: {a_file} is a file"), line
    out = a_file / "completions.jsonl"
    line = _refused(tmp_path, "moeforge-generate", f"run.dir={tmp_path}", "prompt=hi", f"out={out}")
    assert line.endswith(f"out: {out} cannot be created: {a_file} is a file"), line
