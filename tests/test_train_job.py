"""moeforge-train as a user runs it: the installed console script, in a subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import free_port

TRAIN = os.path.join(os.path.dirname(sys.executable), "moeforge-train")


def run_train(args: list[str], cwd, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", **env}
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
    # the closing line sets the training LM loss beside the eval LM loss, not the objective (+ MTP)
    assert summary["final_lm_loss"] == records[-1]["lm_loss"] < records[-1]["loss"]
    (done,) = [line for line in proc.stdout.splitlines() if line.startswith("done: 5 steps")]
    first, final = summary["first_lm_loss"], summary["final_lm_loss"]
    assert f" | LM loss {first:.4f} -> {final:.4f} | " in done, done
    assert f" | eval LM loss {summary['eval_loss']:.4f} (ppl " in done, done
    assert (run_dir / "config.yaml").read_text().count("hidden_size: 128") == 1
    # Hydra wrote nothing of its own and did not change directory.
    assert sorted(os.listdir(tmp_path)) == ["run"]


# A background job's shell ignores SIGINT for it, and a Python started with SIGINT ignored installs
# no KeyboardInterrupt handler: the run gets the disposition a terminal gives it, then is exec'd.
WITH_DEFAULT_SIGINT = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_run_keeps_its_step_and_says_how_to_resume(tmp_path, sig):
    """Ctrl-C or SIGTERM mid-run: the step in progress is finished or dropped cleanly, a checkpoint
    of the last completed step is written, summary.json says "interrupted" beside loss.png, and the
    run ends with exit 130 and one line naming the step and how to resume. The same command resumes."""
    run_dir = tmp_path / "run"
    args = ["model=tiny", "run.steps=400", "run.log_every=1", "checkpoint.every=100", f"run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(
        [sys.executable, "-c", WITH_DEFAULT_SIGINT, TRAIN, *args],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "the run never reached step 2"
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in out + err
    last = err.strip().splitlines()[-1]
    why = "Ctrl-C" if sig == signal.SIGINT else "received SIGTERM"
    match = re.fullmatch(
        rf"moeforge-train: interrupted \({why}\) after step (\d+); run the same command to resume from "
        rf"the checkpoint of step (\d+) in {re.escape(str(run_dir))}",
        last,
    )
    assert match and match[1] == match[2], last
    if sig == signal.SIGINT:  # said at once: the run ends at the step boundary, not now
        assert "moeforge: Ctrl-C: stopping after the step in progress, with a checkpoint" in err
    step = int(match[1])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == step
    assert (run_dir / "loss.png").stat().st_size > 0
    assert (run_dir / "checkpoints" / f"step_{step:08d}" / "COMPLETE").exists()

    if sig == signal.SIGTERM:  # the same command resumes (the Ctrl-C run left the same state)
        resumed = run_train([*args[:1], f"run.steps={step + 1}", *args[2:]], cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resumed from {run_dir / 'checkpoints' / f'step_{step:08d}'} at step {step}" in resumed.stdout


def test_the_pipeline_driver_turns_the_first_signal_into_a_stop_file_and_the_second_into_an_abort(
    tmp_path, capsys
):
    """What `moeforge-train` does on Ctrl-C or SIGTERM while its Ray workers train: the first writes
    run.dir/STOP (the workers stop after the step in progress, with a checkpoint: the Trainer's
    STOP case in tests/test_train_run.py), the second stops waiting at once."""
    from moeforge.platform.launch.ray_train import stop_file_on_signal

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), stop_file_on_signal(str(tmp_path)):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # the handler runs between bytecodes of this thread
        assert (tmp_path / "STOP").read_text() == "SIGTERM to the driver\n"
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # not reached: the second signal raises
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert capsys.readouterr().err == (
        "moeforge-train: SIGTERM: stopping after the step in progress, with a checkpoint (again to stop at "
        "once, without one)\n"
    )


def test_a_rerun_never_rewrites_a_completed_run(tmp_path):
    """The same command again says what is there and exits 0 with nothing rewritten (the other
    answers of finished_run_note: tests/test_train_run.py)."""
    run_dir = tmp_path / "run"
    args = ["model=tiny", "run.steps=2", "checkpoint.every=2", f"run.dir={run_dir}"]
    assert run_train(args, cwd=tmp_path).returncode == 0
    record = {name: (run_dir / name).read_bytes() for name in ("summary.json", "metrics.jsonl", "loss.png")}
    again = run_train(args, cwd=tmp_path)
    assert again.returncode == 0 and "Traceback" not in again.stderr
    assert again.stdout.strip() == (
        f"moeforge-train: run.dir {run_dir} already holds a completed run of 2 steps; nothing to do "
        "(raise run.steps above 2 to continue it from its checkpoint, or choose another run.dir)"
    )
    assert {name: (run_dir / name).read_bytes() for name in record} == record


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


def test_unreachable_s3_run_dir_is_a_storage_error_before_any_work(tmp_path):
    """run.dir on an S3 endpoint that does not answer: one line naming the bucket and the endpoint,
    exit 2, before any work -- the pipeline launcher opens run.dir before it starts Ray, so no Ray
    session directory appears (RAY_TMPDIR points into the empty working directory)."""
    dead = f"http://127.0.0.1:{free_port()}"
    proc = run_train(
        ["experiment=tiny_cpu_dualpipe", "run.dir=s3://moeforge-runs/exp1"],
        cwd=tmp_path,
        AWS_ENDPOINT_URL=dead,
        AWS_ACCESS_KEY_ID="testing-key-id",  # throwaway: the check gets past "no credentials"
        AWS_SECRET_ACCESS_KEY="testing-secret",
        AWS_DEFAULT_REGION="us-east-1",
        RAY_TMPDIR=str(tmp_path / "ray"),
        RAY_ADDRESS="",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        f"moeforge-train: storage error: s3://moeforge-runs (endpoint {dead}): cannot reach the endpoint "
        "(EndpointConnectionError)"
    )
    assert os.listdir(tmp_path) == []  # no Ray session, no run records, no Hydra outputs


def test_a_run_that_fails_on_a_worker_exits_1_naming_the_rank(ray_cluster, tmp_path):
    """A pipeline run whose rank 1 raises in step 1 (the test-only fault hook): the last line is
    `moeforge-train: run failed: ...` naming the rank that raised first (its root cause before the
    ranks that only lost their peer), exit status 1 (not 2: the input was good), and summary.json
    says status "failed" with the same message. The script joins the session's Ray cluster
    (RAY_ADDRESS), as a driver on a running cluster does."""
    run_dir = tmp_path / "run"
    args = [
        "experiment=tiny_cpu_dualpipe",
        f"run.dir={run_dir}",
        "run.steps=2",
        "model.seq_len=32",
        "parallel.zero_stage=0",
        "+tracking.log_timeline=false",
        "parallel.p2p_timeout_s=20",  # the peers of the failed rank give up waiting after 20 s
        "+debug.fault_injection={rank: 1, step: 1, kind: raise}",
    ]
    address = ray_cluster.get_runtime_context().gcs_address
    proc = run_train(args, cwd=tmp_path, RAY_ADDRESS=address)
    assert proc.returncode == 1, proc.stderr[-3000:]
    failed = [line for line in proc.stderr.splitlines() if line.startswith("moeforge-train: ")]
    assert len(failed) == 1, proc.stderr[-3000:]
    message = failed[0].removeprefix("moeforge-train: run failed: ")
    assert message.startswith(
        "pipeline run failed on rank 1: InjectedFault: rank 1 (pp 1, dp 0): injected fault at step 1"
    ), failed[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == message
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]  # what completed before the fault is kept
