"""experiment= presets, -m sweeps, refusals of runs the machine or cluster cannot host, and bad input.

Presets are composed in-process with Hydra's compose API (what moeforge-train composes); everything a
user types runs `moeforge-train` in a subprocess.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import moeforge.jobs.train  # noqa: F401  registers the ${moeforge.sweep_subdir:} resolver of conf/train.yaml
import pytest
import yaml
from hydra import compose, initialize_config_module
from moeforge.platform.config import ParallelConfig, ResourcesConfig, TrainConfig
from moeforge.platform.config.builder import ConfigError
from moeforge.platform.launch.cluster_check import (
    check_cluster_fits,
    check_single_process_fits,
    machine_resources,
)
from omegaconf import OmegaConf

TRAIN = os.path.join(os.path.dirname(sys.executable), "moeforge-train")


def preset(name: str, *overrides: str) -> TrainConfig:
    with initialize_config_module(config_module="moeforge.conf", version_base=None):
        composed = compose(config_name="train", overrides=[f"experiment={name}", *overrides])
    return TrainConfig.from_dict(OmegaConf.to_container(composed, resolve=True))


def run_train(args: list[str], cwd, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [TRAIN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single stderr line of a refused run (exit 2, no traceback)."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("moeforge-train: config error: ")
    return lines[0]


# ------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------
def test_tiny_cpu_single_preset():
    cfg = preset("tiny_cpu_single")
    assert cfg.parallel.schedule == "single" and cfg.parallel.world_size == 1
    assert cfg.model.hidden_size == 128 and cfg.precision.name == "fp32"
    assert cfg.run.name == "tiny_cpu_single" and cfg.run.dir == "runs/tiny_cpu_single"


def test_tiny_cpu_dualpipe_preset_matches_the_single_reference():
    cfg, ref = preset("tiny_cpu_dualpipe"), preset("tiny_cpu_single")
    par = cfg.parallel
    assert (par.schedule, par.pp, par.dp, par.world_size) == ("dualpipe", 2, 1, 2)
    assert cfg.model == ref.model and cfg.data == ref.data and cfg.optim == ref.optim
    assert cfg.run.seed == ref.run.seed and cfg.precision == ref.precision


def test_small_1gpu_fp8_preset():
    cfg = preset("small_1gpu_fp8")
    assert cfg.model.hidden_size == 1024 and cfg.model.num_hidden_layers == 24
    assert cfg.precision.name == "fp8" and cfg.precision.fp8_linear
    assert cfg.parallel.schedule == "single" and cfg.resources.gpus_per_worker == 1


def test_v3_preset_is_the_published_layout():
    cfg = preset("v3_671b_2048gpu")
    par = cfg.parallel
    assert (par.schedule, par.pp, par.dp, par.ep, par.zero_stage) == ("dualpipe", 16, 128, 64, 1)
    assert par.world_size * cfg.resources.gpus_per_worker == 2048
    assert cfg.model.hidden_size == 7168 and cfg.model.n_routed_experts == 256
    assert cfg.precision.name == "fp8" and cfg.data.global_batch == 15360


def test_v3_pretrains_with_plain_rope_and_extends_with_yarn():
    """Pre-training at 4K without YaRN; the two extension phases (report, section 4.3) with YaRN
    s = 40, alpha = 1, beta = 32 over the original 4K and sqrt(t) = 0.1 ln s + 1, from the same
    model preset, which stays the published config (tests/test_accounting.py)."""
    from moeforge.platform.launch.ray_train import validate_pipeline

    pre, ext32, ext128 = (preset(n) for n in ("v3_671b_2048gpu", "v3_671b_extend_32k", "v3_671b_extend_128k"))
    assert pre.model.rope_scaling is None and pre.model.seq_len == pre.model.max_position_embeddings == 4096
    assert pre.model.softmax_scale == 192**-0.5  # no YaRN temperature
    for cfg, seq, batch in ((ext32, 32768, 1920), (ext128, 131072, 480)):
        yarn = cfg.model.rope_scaling
        assert (yarn.factor, yarn.original_max_position_embeddings) == (40.0, 4096)
        assert (yarn.beta_fast, yarn.beta_slow, yarn.mscale, yarn.mscale_all_dim) == (32.0, 1.0, 1.0, 1.0)
        assert cfg.model.softmax_scale == pytest.approx(192**-0.5 * (0.1 * math.log(40) + 1) ** 2)
        assert (cfg.model.seq_len, cfg.data.global_batch, cfg.run.steps) == (seq, batch, 1000)
        assert (cfg.optim.schedule, cfg.optim.lr, cfg.optim.warmup_steps) == ("constant", 7.3e-6, 0)
        # the rest of the model is the pre-trained one
        same = {"rope_scaling", "max_position_embeddings", "seq_len", "bias_update_speed", "mtp_loss_weight"}
        for field in dataclasses.fields(cfg.model):
            if field.name not in same:
                assert getattr(cfg.model, field.name) == getattr(pre.model, field.name), field.name
        assert cfg.precision == pre.precision and cfg.parallel.layers_per_stage == pre.parallel.layers_per_stage
    for cfg in (pre, ext32, ext128):  # every check that needs no cluster passes ...
        validate_pipeline(cfg)
        with pytest.raises(ConfigError, match=r"needs \d+ GPUs .* the cluster has 8"):  # ... then this
            check_cluster_fits(cfg.parallel, cfg.resources, {"CPU": 16.0, "GPU": 8.0})


def test_v3_schedules_gamma_and_lambda_at_the_reports_token_counts():
    from moeforge.platform.optim.recipe_schedule import RecipeValues, recipe_at, tokens_before

    cfg = preset("v3_671b_2048gpu")
    per_step = cfg.data.global_batch * cfg.model.seq_len
    assert per_step == 62_914_560
    assert (cfg.model.bias_update_speed, cfg.model.mtp_loss_weight) == (0.001, 0.3)
    assert cfg.optim.mtp_loss_weight_schedule == [(10e12, 0.1)]
    assert cfg.optim.bias_update_speed_schedule == [(14.3e12, 0.0)]
    # lambda 0.1 after the first 10T tokens: 0-based step 158,946 is the first to start past them
    assert tokens_before(158_945, cfg) < 10e12 <= tokens_before(158_946, cfg)
    assert recipe_at(158_945, cfg) == RecipeValues(0.001, 0.3)
    assert recipe_at(158_946, cfg) == RecipeValues(0.001, 0.1)
    # gamma 0 for the last 500B of 14.8T: from 14.3T on, to the run's last step
    assert recipe_at(227_292, cfg).bias_update_speed == 0.001
    assert recipe_at(227_293, cfg).bias_update_speed == 0.0
    assert recipe_at(cfg.run.steps - 1, cfg) == RecipeValues(0.0, 0.1)
    assert 14.7e12 < cfg.run.steps * per_step < 14.8e12
    # the extension phases continue at the end values, without schedules of their own
    for name in ("v3_671b_extend_32k", "v3_671b_extend_128k"):
        ext = preset(name)
        assert {recipe_at(s, ext) for s in (0, ext.run.steps - 1)} == {RecipeValues(0.0, 0.1)}


def test_command_line_overrides_beat_the_preset():
    cfg = preset("tiny_cpu_single", "run.steps=3", "optim.lr=1e-3", "model.num_hidden_layers=2")
    assert (cfg.run.steps, cfg.optim.lr, cfg.model.num_hidden_layers) == (3, 1e-3, 2)


# ------------------------------------------------------------------------------------------------
# What the cluster / machine can host
# ------------------------------------------------------------------------------------------------
def test_v3_is_refused_on_a_small_cluster_with_the_numbers():
    v3 = preset("v3_671b_2048gpu")
    with pytest.raises(ConfigError) as err:
        check_cluster_fits(v3.parallel, v3.resources, {"CPU": 16.0, "GPU": 8.0, "memory": 1e11})
    msg = str(err.value)
    assert "needs 2048 GPUs" in msg and "the cluster has 8" in msg and "pp=16 x dp=128" in msg


def test_cluster_check_accepts_a_cluster_that_fits_and_counts_cpus_too():
    v3 = preset("v3_671b_2048gpu")
    check_cluster_fits(v3.parallel, v3.resources, {"CPU": 2048.0, "GPU": 2048.0})
    with pytest.raises(ConfigError, match=r"needs 2048 CPUs .* the cluster has 2047"):
        check_cluster_fits(v3.parallel, v3.resources, {"CPU": 2047.0, "GPU": 2048.0})
    two_by_two = ParallelConfig(schedule="1f1b", pp=2, dp=2, backend="gloo")  # NCCL refuses half a GPU
    half = ResourcesConfig(gpus_per_worker=0.5)
    check_cluster_fits(two_by_two, half, {"CPU": 4.0, "GPU": 2.0})  # 4 x 0.5 GPU adds up to exactly 2
    with pytest.raises(ConfigError, match="needs 2 GPUs"):
        check_cluster_fits(two_by_two, half, {"CPU": 4.0})  # a missing key counts as 0


def test_cluster_check_waits_for_an_autoscaler_when_asked():
    par = ParallelConfig(schedule="dualpipe", pp=16, dp=128)
    check_cluster_fits(par, ResourcesConfig(gpus_per_worker=1, wait_for_autoscaler=True), {"CPU": 1.0})


def test_single_process_memory_check():
    tiny, v3 = preset("tiny_cpu_single"), preset("v3_671b_2048gpu")
    here = machine_resources()
    assert here["CPU"] >= 1 and here["memory"] > 1e9
    check_single_process_fits(tiny.model, tiny.resources, here)
    with pytest.raises(ConfigError, match=r"needs 10,922.2 GB \(682.64B parameters x 16 bytes"):
        check_single_process_fits(v3.model, tiny.resources, {"memory": 1e12})
    small = preset("small_1gpu_fp8")
    one_gpu = {"CPU": 8.0, "GPU": 1.0, "memory": 1e12}
    check_single_process_fits(small.model, small.resources, {**one_gpu, "gpu_memory": 80e9})
    with pytest.raises(ConfigError, match=r"needs 32\.\d GB .* 24\.0 GB of memory of one GPU"):
        check_single_process_fits(small.model, small.resources, {**one_gpu, "gpu_memory": 24e9})
    with pytest.raises(ConfigError, match=r"needs 1 GPU\(s\), this machine has 0"):
        check_single_process_fits(small.model, small.resources, {"CPU": 8.0, "memory": 1e12})


def test_too_big_for_this_machine_is_refused_before_any_work(tmp_path):
    line = one_error_line(run_train(["model=deepseek_v3", f"run.dir={tmp_path / 'run'}"], cwd=tmp_path))
    assert "model: the training state needs 10,922.2 GB" in line and "GB of RAM" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(machine_resources()["GPU"] > 0, reason="checks the refusal on a machine without a GPU")
def test_small_1gpu_fp8_is_refused_without_a_gpu(tmp_path):
    line = one_error_line(
        run_train(["experiment=small_1gpu_fp8", f"run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    )
    assert line.endswith("resources.gpus_per_worker: the run needs 1 GPU(s), this machine has 0")
    assert not (tmp_path / "run").exists()


def test_v3_launch_is_refused_before_any_worker_starts(tmp_path):
    """Through platform.launch.ray_train: it connects to Ray (a fresh local cluster here), then refuses."""
    proc = run_train(["experiment=v3_671b_2048gpu", f"run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # Ray's own start-up lines come before it
    assert last.startswith("moeforge-train: config error: parallel: the run needs 2048 GPUs (pp=16 x dp=128")
    assert re.search(r"the cluster has \d+;", last)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# Bad input: one line naming the key, exit 2, nothing written
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.hidden_size=abc", "model.hidden_size: expected int, got 'abc'"),
        ("run.steps=abc", "run.steps: expected int, got 'abc'"),
        ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
        ("+foo=1", "foo: unknown config section"),
        ("+run.foo=1", "run.foo: unknown key"),
        ("foo=1", "Could not override 'foo'"),
        (
            "experiment=nope",
            "Could not find 'experiment/nope' Available options in 'experiment': sft_tiny_cpu",
        ),
        ("model=nope", "Could not find 'model/nope'"),
        (
            "optim.mtp_loss_weight_schedule=[[100,0.1],[50,0.2]]",
            "optim.mtp_loss_weight_schedule[1]: from_tokens must exceed the previous entry's (100), got 50",
        ),
    ],
)
def test_bad_input_fails_with_one_line(tmp_path, override, expected):
    line = one_error_line(run_train([override, f"run.dir={tmp_path / 'run'}"], cwd=tmp_path))
    assert expected in line
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# -m sweeps
# ------------------------------------------------------------------------------------------------
def test_sweep_members_write_their_own_run_dirs(tmp_path):
    proc = run_train(
        ["-m", "experiment=tiny_cpu_single", "run.steps=2", "run.eval_every=0", "optim.lr=1e-3,2e-3"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "runs" / "tiny_cpu_single"
    assert sorted(os.listdir(tmp_path)) == ["runs"]  # nothing in the launch directory itself
    assert sorted(os.listdir(sweep)) == ["0", "1", "multirun.yaml"]
    losses = []
    for member, lr in (("0", 1e-3), ("1", 2e-3)):
        config = yaml.safe_load((sweep / member / "config.yaml").read_text())
        assert config["optim"]["lr"] == lr and config["run"]["dir"] == str(sweep / str(member))
        records = [json.loads(line) for line in (sweep / member / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2]
        losses.append([r["loss"] for r in records])
    assert losses[0][0] == losses[1][0]  # same seed and data: the first step precedes any update
    assert losses[0][1] != losses[1][1]  # the learning rates differ


def test_sweep_with_one_fixed_run_dir_is_refused(tmp_path):
    run_dir = tmp_path / "same"
    proc = run_train(
        ["-m", "run.steps=1", "run.eval_every=0", "run.seed=1,2", f"run.dir={run_dir}"], cwd=tmp_path
    )
    line = one_error_line(proc)
    assert f"run.dir: {run_dir} is already used by an earlier member of this sweep" in line
