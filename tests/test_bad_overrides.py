"""A bad command-line override, through the installed console scripts: one line naming the key, exit
status 2, no traceback, and nothing done (no run.dir, no Ray) -- for a training run and an estimate.

Each case fails while the config is built, before torch is imported, so it takes about a second.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import yaml
from moeforge.platform.cli import settable_overrides
from moeforge.platform.config.train import TrainConfig

BIN = os.path.dirname(sys.executable)

# (override, what the one line must contain). The first four come from moeforge's config builder, the
# others from Hydra (an override of a key the YAML lacks, a group option that does not exist).
COMMON = [
    ("model.routed_scaling_factor=abc", "model.routed_scaling_factor: expected float, got 'abc'"),
    ("model.n_group=8.0", "model.n_group: expected int, got 8.0"),
    ("+model.nope=1", "model.nope: unknown key (known: "),
    ("model=nosuchmodel", "Could not find 'model/nosuchmodel'"),
]
TRAIN_CASES = [
    *COMMON,
    # a key no config has: named with the closest valid one, never Hydra's "+" advice
    ("model.nope=1", "model.nope: unknown key (known: "),
    ("run.stepz=10", "run.stepz: unknown key (did you mean run.steps?)"),
    ("data=tokens", "data.path: required by the chosen config group; set data.path=..."),
    ("optim.lr=abc", "optim.lr: expected float, got 'abc'"),
    ("run.steps=2.5", "run.steps: expected int, got 2.5"),
    ("parallel.pp=2.5", "parallel.pp: expected int, got 2.5"),
    ("parallel=nosuch", "Could not find 'parallel/nosuch'"),
    ("init.from=hf:/nonexistent/ckpt", "init.from: /nonexistent/ckpt/config.json: not found"),
    ("init.from=weights.bin", "init.from: must be hf:<dir> or run:<dir>[@<step>]"),
    ("model=from_checkpoint", "model: from_checkpoint takes the model of init.from"),
]
ESTIMATE_CASES = [
    *COMMON,
    ("model.nope=1", "Could not override 'model.nope'"),
    ("cluster.mfu=abc", "cluster.mfu: expected float, got 'abc'"),
    ("cluster.gpus=2.5", "cluster.gpus: expected int, got 2.5"),
    ("+cluster.nope=1", "cluster.nope: unknown key (known: "),
    # A training section asks moeforge-estimate for a memory plan: it composes conf/train.yaml then.
    ("parallel=nosuch", "Could not find 'parallel/nosuch'"),
    ("parallel.ep=3", "parallel.ep: must divide dp=1, got 3"),
]


def _one_line(proc: subprocess.CompletedProcess, prefix: str) -> str:
    """The single output line of a refused command (stdout and stderr together)."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


def _run(script: str, args: list[str], cwd, **extra_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra_env}
    env.pop("HYDRA_FULL_ERROR", None)  # set, it asks for the full traceback
    env.pop("RAY_ADDRESS", None)
    command = [os.path.join(BIN, script), *args]
    return subprocess.run(command, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("override, expected", TRAIN_CASES)
def test_train_refuses_a_bad_override_before_any_work(tmp_path, override, expected):
    run_dir = tmp_path / "run"
    proc = _run("moeforge-train", ["experiment=tiny_cpu_single", f"run.dir={run_dir}", override], tmp_path)
    line = _one_line(proc, "moeforge-train: config error: ")
    assert expected in line
    assert not run_dir.exists()
    assert os.listdir(tmp_path) == []  # nor anything else (Hydra outputs, a Ray session dir)


def test_every_config_key_is_settable_as_the_docs_write_it(tmp_path):
    """Keys a group's YAML does not list (the docs name them) are set without Hydra's `+`."""
    overrides = [
        "resources.peak_tflops_per_worker=989",
        "resources.gpu_memory_gb=80",
        "parallel.ep_ranks_per_node=1",
        "parallel.overlap_order=forward_first",
        "resources.worker_resources={moeforge_worker:1}",
        "parallel.layers_per_stage=[4]",
    ]
    proc = _run("moeforge-train", ["experiment=tiny_cpu_single", *overrides, "--cfg", "job"], tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    composed = yaml.safe_load(proc.stdout)
    parallel, resources = composed["parallel"], composed["resources"]
    assert (resources["peak_tflops_per_worker"], resources["gpu_memory_gb"], parallel["overlap_order"]) == (
        989,
        80,
        "forward_first",
    )
    assert resources["worker_resources"] == {"moeforge_worker": 1} and parallel["layers_per_stage"] == [4]


def test_settable_overrides_covers_every_field_of_every_section():
    sections = TrainConfig.section_types()
    for section, cls in sections.items():
        for field in dataclasses.fields(cls):
            key = f"{section}.{field.name.rstrip('_')}"
            assert settable_overrides([f"{key}=1"], sections) == [f"++{key}=1"]
    untouched = ["model=tiny", "+run.x=1", "~run.name", "-m", "hydra.verbose=true", "unknown.key=1"]
    assert settable_overrides(untouched, sections) == untouched


def test_train_refuses_a_gpu_fraction_that_nccl_would_share(tmp_path):
    """Two pipeline ranks on half a GPU each would meet on one GPU, which NCCL refuses: refused
    before launch, as one line naming the field."""
    run_dir = tmp_path / "run"
    args = ["experiment=tiny_cpu_dualpipe", f"run.dir={run_dir}", "resources.gpus_per_worker=0.5"]
    line = _one_line(_run("moeforge-train", args, tmp_path), "moeforge-train: config error: ")
    assert (
        "resources.gpus_per_worker: must be a whole number of GPUs with NCCL (parallel.backend=auto), got 0.5" in line
    )
    assert not run_dir.exists()
    assert os.listdir(tmp_path) == []


def test_train_refuses_a_ds_accelerator_the_workers_would_refuse(tmp_path):
    """ZeRO's DeepSpeed accelerator follows each worker's device; an environment that says
    otherwise is refused once the cluster is known, before any worker starts (after Ray's own
    start-up lines), not by every worker."""
    run_dir = tmp_path / "run"
    args = ["experiment=tiny_cpu_dualpipe", f"run.dir={run_dir}"]
    proc = _run("moeforge-train", args, tmp_path, DS_ACCELERATOR="cuda")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in output, output[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("moeforge-train: config error: DS_ACCELERATOR=cuda contradicts this worker's device cpu")
    assert not run_dir.exists()


@pytest.mark.parametrize("override, expected", ESTIMATE_CASES)
def test_estimate_refuses_a_bad_override(tmp_path, override, expected):
    line = _one_line(_run("moeforge-estimate", [override], tmp_path), "moeforge-estimate: error: ")
    assert expected in line
    assert os.listdir(tmp_path) == []


def test_help_lists_what_each_job_takes(capsys):
    """moeforge-train --help offers the groups a training run composes, each with its options, and
    not the other jobs' groups in conf/ (clusters/, network/); moeforge-bench --help names every suite."""
    from moeforge.jobs import bench

    proc = subprocess.run(
        [os.path.join(BIN, "moeforge-train"), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    groups = dict(
        line.strip().split(": ", 1) for line in proc.stdout.splitlines() if line.startswith("  ") and ": " in line
    )
    assert list(groups) == ["model", "parallel", "precision", "data", "optim", "tracking", "checkpoint", "experiment"]
    assert "tiny_cpu_dualpipe" in groups["experiment"].split(", ") and "fp8" in groups["precision"].split(", ")
    assert "clusters" not in proc.stdout and "network" not in proc.stdout
    assert bench.main(["--help"]) == 0
    listed = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("    moeforge-bench ")]
    assert listed == list(bench.SUITES)
