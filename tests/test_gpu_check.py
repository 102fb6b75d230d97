"""kernels/gpu_check.sh and its Python steps (platform/bench/gpu_check*.py), exercised on the CPU.

No GPU here: every Python step runs at its tiny size on the CPU (torch twins, gloo instead of NCCL,
Triton's interpreter for the launch-config checks), in fresh interpreters that refuse to import
what the GPU image lacks and nothing carries there (Ray, Hydra, omegaconf, boto3, wandb), and the
JSON lines each step writes are checked field by field. The bash scripts are parsed (`bash -n`), and
gpu_check.sh itself runs a few steps: the results lines it adds, a failed step that does not stop
the next, its exit status. The two slow subprocesses start together (module fixture).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from moeforge.platform.bench import (
    gpu_check,
    gpu_check_generate,
    gpu_check_pipeline,
    gpu_check_results,
    gpu_check_train,
    gpu_check_zero,
)
from triton_interpreter import twin_row_problems

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "kernels" / "gpu_check.sh"
WHEELS = ROOT / "kernels" / "gpu_wheels.sh"

# Imported nowhere on the GPU check's paths: the image lacks them and no wheel carries them.
ABSENT_ON_THE_IMAGE = ("ray", "hydra", "omegaconf", "antlr4", "boto3", "botocore", "wandb")

_REFUSE_IMPORTS = f"""
import importlib.abc, sys
class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {ABSENT_ON_THE_IMAGE!r}:
            raise ImportError(f"{{name}} is not on the GPU image")
        return None
sys.meta_path.insert(0, _Refuse())
"""

CPU_STEPS = ["env", "bench", "train_bf16", "train_fp8", "zero", "pipeline", "generate", "report"]


def _python(code: str, env: dict | None = None) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MOEFORGE_WARP_SPECIALIZE")}
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**base, "OMP_NUM_THREADS": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both subprocesses at once: the CPU steps through the command line, and the twin step's
    launch-config checks under Triton's interpreter (with twin_check's suite replaced by one row:
    tests/test_kernels_tolerance.py runs the suite itself)."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    cpu_out, twin_out, twin_json = tmp / "cpu.jsonl", tmp / "twin.jsonl", tmp / "twin.json"
    cpu = _python(
        _REFUSE_IMPORTS
        + textwrap.dedent(f"""
        from moeforge.platform.bench import gpu_check
        code = gpu_check.main({CPU_STEPS!r} + ["--size", "tiny", "--device", "cpu", "--out", {str(cpu_out)!r},
                                 "--bench-json", {str(tmp / "kernels.json")!r}])
        for name in {ABSENT_ON_THE_IMAGE!r}:
            assert name not in sys.modules, name
        sys.exit(code)
        """)
    )
    twin = _python(
        _REFUSE_IMPORTS
        + textwrap.dedent(f"""
        import torch
        from moeforge.platform.bench import gpu_check_kernels, gpu_check_results, twin_check
        res = gpu_check_results.Results({str(twin_out)!r})
        twin_check.run_checks = lambda size, device, compiled: [{{"check": "suite", "passed": True}}]
        ok = gpu_check_kernels.twin_step(res, torch.device("cpu"), "tiny", twin_json={str(twin_json)!r})
        sys.exit(0 if ok else 1)
        """),
        env={"TRITON_INTERPRET": "1"},
    )
    out = {}
    for name, proc in (("cpu", cpu), ("twin", twin)):
        stdout, _ = proc.communicate(timeout=600)
        out[name] = (proc.returncode, stdout)
    return {"tmp": tmp, "cpu": (*out["cpu"], cpu_out), "twin": (*out["twin"], twin_out, twin_json)}


def _step(lines: list[dict], step: str, what: str | None = None) -> list[dict]:
    return [x for x in lines if x["step"] == step and (what is None or x["what"] == what)]


# ---- the Python steps on the CPU -------------------------------------------------------------------


def test_every_cpu_step_passes_and_writes_its_lines(runs):
    code, stdout, path = runs["cpu"]
    assert code == 0, stdout[-4000:]
    lines = _lines(path)
    assert all({"step", "what", "at"} <= set(x) for x in lines)
    assert not [x for x in lines if x.get("passed") is False], stdout[-4000:]
    assert list(dict.fromkeys(x["step"] for x in lines)) == [s for s in CPU_STEPS if s != "report"]
    for step in CPU_STEPS[:-1]:
        assert f"\n{step}" in "\n" + stdout, step  # the report's table names every step


def test_env_line(runs):
    (env,) = _step(_lines(runs["cpu"][2]), "env")
    assert env["what"] == "environment" and env["device"] == "cpu" and env["torch"] == torch.__version__
    assert env["peak_tflops"] is None and "989" in env["peak_basis"] and env["kernels"] == "torch"


def test_bench_lines_are_the_benchmark_rows_then_its_summary(runs):
    lines = _step(_lines(runs["cpu"][2]), "bench")
    rows, summary = lines[:-1], lines[-1]
    assert summary["what"] == "summary" and set(summary["fp8_over_bf16_large_gemms"]) == {"mlp_up"}
    kinds = {r["kind"] for r in rows}
    assert kinds == {"gemm", "grouped", "linear", "quant"}
    impls = {r["impl"] for r in rows if r["kind"] == "gemm"}
    assert {"bf16_matmul", "fp8_gemm", "fp8_gemm+act_quant", "scaled_mm_tensorwise"} <= impls
    for r in rows:
        assert r["what"] == f"{r['kind']} {r['name']} {r['impl']}"
        assert "error" in r or r["ms"] > 0 and (r.get("tflops", 0) > 0 or r.get("gbps", 0) > 0), r
    report = json.loads((runs["tmp"] / "kernels.json").read_text())
    assert report["rows"] == [{k: v for k, v in r.items() if k not in ("step", "what", "at")} for r in rows]


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_train_lines(runs, precision):
    lines = _step(_lines(runs["cpu"][2]), f"train_{precision}")
    built, warm_up, *steps, summary = lines
    size = gpu_check_train.TRAIN["tiny"]
    assert built["what"] == "built" and built["device"] == "cpu" and built["params"] > 0
    assert warm_up["what"] == "warm_up" and warm_up["launches"] == 0  # the torch twins: nothing to compile
    assert [s["iteration"] for s in steps] == list(range(1, size["steps"] + 1))
    assert all(s["loss"] > 0 and s["grad_norm"] > 0 and s["step_s"] > 0 for s in steps)
    assert summary["what"] == "summary" and summary["passed"] and summary["stopped_early"] is None
    assert summary["steps_done"] == summary["steps_asked"] == size["steps"]
    assert summary["timed_steps"] == size["steps"] - size["timed_after"]
    assert summary["tokens_per_step"] == size["global_batch"] * size["seq_len"]
    assert summary["tokens_per_s"] > 0 and summary["flops_per_token"] > 0
    assert summary["mfu"] is None and summary["peak_tflops"] is None  # a CPU has no peak here
    assert summary["peak_memory_gib"] is None
    assert summary["final_loss"] == steps[-1]["loss"] and summary["precision"] == precision
    for key in ("tokens_per_s", "timed_steps", "mfu", "peak_memory_gib"):  # each step: the figures so far
        assert steps[-1][key] == summary[key], key
    assert steps[0]["tokens_per_s"] is None  # the warm-up step is not timed
    if precision == "fp8":  # same seed, same batches: close to the bf16 run after two steps
        assert summary["fp8_over_bf16_at_step"] == size["steps"]
        assert summary["fp8_over_bf16"] == pytest.approx(1.0, abs=0.02)


def test_zero_lines(runs):
    lines = _step(_lines(runs["cpu"][2]), "zero")
    setup, *steps, loss = lines
    assert setup["backend"] == "gloo" and setup["world_size"] == 1 and setup["zero_stage"] == 1
    assert len(steps) == gpu_check_zero.ZERO["tiny"]["steps"]
    for s in steps:
        assert s["passed"] and s["on_device"] and s["devices"] == ["cpu"]
        assert s["param_diff_over_bound"] <= 1 and s["grad_norm_rel_diff"] <= gpu_check_zero.GRAD_NORM_RTOL
        assert s["max_param_moved"] > 100 * s["max_param_diff"]  # the bound is far below one update
    assert loss["passed"] and loss["final_loss"] < loss["first_loss"]


def test_pipeline_line(runs):
    (run,) = _step(_lines(runs["cpu"][2]), "pipeline")
    assert run["passed"] and run["backend"] == "gloo" and run["clock"] == "HostClock"
    assert run["steps"] == gpu_check_pipeline.PIPELINE["tiny"]["steps"] and run["compute_records"] > 0
    assert all(run["checks"].values()) and 0 <= run["bubble_fraction"] < 1


def test_generate_lines(runs):
    lines = _step(_lines(runs["cpu"][2]), "generate")
    trained, job, *decodes = lines
    assert trained["what"] == "trained"
    assert trained["steps"] == gpu_check_generate.GENERATE["tiny"]["train_steps"]
    assert job["equal"] and len(job["tokens"]) == len(gpu_check_generate.PROMPTS)
    assert "tokens/s" in job["stats_plain"] and "acceptance rate" in job["stats_mtp"]
    assert [d["batch"] for d in decodes] == [1, len(gpu_check_generate.PROMPTS)]
    for d in decodes:
        assert d["equal"] and d["tokens_per_s_plain"] > 0 and d["tokens_per_s_mtp"] > 0
        assert 0 <= d["acceptance_rate"] <= 1


def test_twin_checks_every_launch_config_warp_specialized_first(runs):
    from moeforge.kernels.triton_gemm import GPU_CONFIGS

    code, stdout, path, twin_json = runs["twin"]
    assert code == 0, stdout[-4000:]
    lines = _lines(path)
    configs, suite = lines[:-1], lines[-1]
    per_config = len(configs) // len(GPU_CONFIGS)
    assert per_config == 7 and len(configs) == per_config * len(GPU_CONFIGS)
    flags = [x["warp_specialize"] for x in configs[::per_config]]
    assert flags == sorted((bool(c.kwargs["WARP_SPECIALIZE"]) for c in GPU_CONFIGS), reverse=True)
    assert any(flags)
    for x in configs:  # each verdict recomputed from the row's error and model tolerance
        assert twin_row_problems(x, x["tol"]) == [] and x["what"].endswith(f"[{x['config']}]"), x
    kernels = {x["what"].split("[")[0] for x in configs}
    assert kernels == {"fp8_gemm", "fp8_grouped_gemm", "fp8_wgrad_grouped_gemm"}
    report = json.loads(twin_json.read_text())
    assert suite["what"] == "suite" and report["results"] == [{"check": "suite", "passed": True}]
    assert report["warp_specialize_autotuning"] is False and report["device"] == "cpu"


# ---- in-process parts ------------------------------------------------------------------------------


def test_results_append_and_skip_a_torn_last_line(tmp_path):
    res = gpu_check_results.Results(str(tmp_path / "deep" / "r.jsonl"))
    res.write("a", "one", value=torch.tensor(2.5), dtype=torch.bfloat16)
    with open(res.path, "a") as f:
        f.write('{"step": "b", "wh')  # a write cut short by a timeout
    assert [x["what"] for x in res.read()] == ["one"]
    assert res.read()[0]["value"] == 2.5 and res.read()[0]["dtype"] == "torch.bfloat16"


def test_fp8_over_bf16_compares_the_last_step_both_runs_completed(tmp_path):
    res = gpu_check_results.Results(str(tmp_path / "r.jsonl"))
    shape = {"model": "small", "seq_len": 1024, "global_batch": 8, "microbatches": 2}
    fp8_losses = [10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.4]
    assert gpu_check_train._fp8_over_bf16(res, shape, fp8_losses)["fp8_over_bf16"] is None
    res.write("train_bf16", "built", **{**shape, "seq_len": 4096})
    assert "another shape" in gpu_check_train._fp8_over_bf16(res, shape, fp8_losses)["fp8_over_bf16_note"]
    res.write("train_bf16", "built", **shape)  # a later run: its steps are the ones compared
    for i, loss in enumerate([10.0, 9.0, 8.0, 8.0, 6.0, 4.0], start=1):
        res.write("train_bf16", "step", iteration=i, loss=loss)
    ratios = gpu_check_train._fp8_over_bf16(res, shape, fp8_losses)
    assert ratios["fp8_over_bf16_at_step"] == 6  # bf16 stopped after 6 steps, fp8 ran 7
    assert ratios["fp8_over_bf16"] == 5.0 / 4.0
    assert ratios["fp8_over_bf16_last5"] == pytest.approx((9 + 8 + 7 + 6 + 5) / (9 + 8 + 8 + 6 + 4))


def test_the_gpu_sizes_are_valid_runs(tmp_path):
    """What the GPU run will build, checked here: the small model at the shortened shape, both
    precisions, and the tiny runs of zero and generate (TrainConfig validates across sections)."""
    cpu = torch.device("cpu")
    for precision in ("bf16", "fp8"):
        cfg = gpu_check_train.train_config("gpu", precision, cpu, str(tmp_path))
        assert cfg.model.hidden_size == 1024 and cfg.model.num_hidden_layers == 24  # the small preset
        assert cfg.model.n_routed_experts == 64 and cfg.model.seq_len == 1024  # seq_len shortened
        assert (cfg.data.global_batch, cfg.parallel.microbatches, cfg.run.steps) == (8, 2, 30)
        assert cfg.precision.name == precision and cfg.optim.lr == 1e-3
    on_gpu = gpu_check_train.train_config("gpu", "bf16", torch.device("cuda"), str(tmp_path))
    assert on_gpu.resources.gpus_per_worker == 1  # training_device then picks the GPU
    for sizes in (gpu_check_zero.ZERO["gpu"], gpu_check_generate.GENERATE["gpu"]):
        cfg = gpu_check_train.train_config("tiny", "fp32", cpu, str(tmp_path), model="tiny", seq_len=sizes["seq_len"],
                                     global_batch=sizes["global_batch"], microbatches=1)  # fmt: skip
        assert cfg.model.num_nextn_predict_layers == 1  # MTP: what speculative decoding drafts with


def test_the_peak_is_the_bf16_datasheet_figure_of_an_h100_or_h200_sxm(monkeypatch):
    cuda = torch.device("cuda", 0)
    for name, peak in (("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0), ("NVIDIA H100 PCIe", None),
                       ("NVIDIA A100-SXM4-80GB", None)):  # fmt: skip
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert gpu_check_results.peak_tflops(cuda) == peak, name
    assert gpu_check_results.peak_tflops(torch.device("cpu")) is None


def test_report_names_failures_and_steps_out_of_time():
    lines = [
        {"step": "twin", "what": "fp8_gemm[x]", "check": "fp8_gemm[x]", "rel_err": 2e-3, "tol": 1e-3,
         "passed": False, "warp_specialize": True},
        {"step": "twin", "what": "fp8_gemm[y]", "check": "fp8_gemm[y]", "rel_err": 1e-4, "tol": 1e-3,
         "passed": True, "warp_specialize": False},
        {"step": "train_bf16", "what": "built", "model": "small", "precision": "bf16"},
        {"step": "train_bf16", "what": "step", "iteration": 1, "loss": 10.5, "tokens_per_s": None},
        {"step": "train_bf16", "what": "step", "iteration": 2, "loss": 10.25, "tokens_per_s": 1234.0, "mfu": 0.125,
         "peak_memory_gib": 41.0},
        {"step": "script", "what": "train_bf16", "seconds": 70, "limit": 70, "exit": 124},
        {"step": "train_fp8", "what": "error", "error": "RuntimeError: CUDA out of memory", "passed": False},
    ]  # fmt: skip
    text = "\n".join(gpu_check.report_lines(lines))
    # a run stopped by its timeout: the figures of its last step
    assert "small bf16: 2 steps, 1234 tokens/s, MFU 0.125, peak memory 41.0 GiB, final loss 10.2" in text
    assert "train_bf16: 70 s of 70 s, exit 124 (out of time)" in text
    assert "twin        1/2 checks passed" in text and "FAIL fp8_gemm[x]: rel_err=0.002, tol=0.001" in text
    assert "warp-specialized configs: 0/1" in text and "worst rel_err / tol: 2" in text
    assert "train_fp8   0/1 checks passed; error: RuntimeError: CUDA out of memory" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["warmup"], "unknown step 'warmup'"),
        (["env", "--size", "huge"], "--size: gpu or tiny, got 'huge'"),
        (["env", "--budget-s", "soon"], "argument --budget-s: invalid float value: 'soon'"),
    ],
)
def test_bad_arguments_get_one_line(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main([*argv, "--out", str(tmp_path / "r.jsonl")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gpu_check: error: ") and message in err


def test_a_step_that_raises_is_a_failed_line_and_the_next_step_runs(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert gpu_check.main(["env", "report", "--device", "cuda:7", "--out", str(out)]) == 1
    lines = _lines(out)
    assert lines[0]["step"] == "env" and lines[0]["what"] == "error" and lines[0]["passed"] is False
    assert "torch sees no CUDA GPU" in lines[0]["error"]
    assert "env         0/1 checks passed; error:" in capsys.readouterr().out  # report ran after it


# ---- the scripts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("script", [SCRIPT, WHEELS])
def test_the_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_the_step_limits_add_up_to_under_nine_minutes():
    """Each step's `timeout` limit as the script gives it, plus the 3 s each may take from TERM to KILL."""
    text = SCRIPT.read_text()
    limits = {m[0]: int(m[1]) for m in re.findall(r"^\s*(?:run_)?step ([\w-]+) (\d+) ", text, re.MULTILINE)}
    assert set(limits) == {"nvidia-smi", "env", "wheels", "sass", "twin", "bench", "train_bf16", "train_fp8",
                           "zero", "pipeline", "generate", "report"}  # fmt: skip
    assert "timeout -k 3 " in text
    assert sum(limits.values()) + 3 * len(limits) < 9 * 60
    assert f"limits add up to {sum(limits.values())} s" in text  # the header says so
    budgets = {
        m[0]: (int(m[1]), int(m[2]))
        for m in re.findall(r"^step (train_\w+) (\d+) .* --budget-s (\d+)$", text, re.MULTILINE)
    }
    assert set(budgets) == {"train_bf16", "train_fp8"}
    assert all(budget < limit for limit, budget in budgets.values())


def _run_script(tmp_path, **env) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(SCRIPT)],
        cwd=tmp_path,
        env={**os.environ, "OUT": str(out), "GPU_CHECK_SIZE": "tiny", "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return proc, _lines(out / "results.jsonl")


def test_the_script_runs_the_steps_asked_for(tmp_path):
    proc, lines = _run_script(tmp_path, GPU_CHECK_STEPS="env report")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [x["what"] for x in lines] == ["environment", "env", "report"]
    assert [x["exit"] for x in lines if x["step"] == "script"] == [0, 0]
    assert "gpu_check: exit 0" in proc.stdout and "env: " in proc.stdout  # the report, last
    assert (tmp_path / "out" / "log.txt").read_text().count("=== ") == 4


def test_the_script_runs_every_step_after_a_failure_and_exits_1(tmp_path):
    proc, lines = _run_script(tmp_path, GPU_CHECK_STEPS="env sass report", PYTHON="false")
    assert proc.returncode == 1
    assert [(x["what"], x["exit"]) for x in lines] == [("env", 1), ("sass", 1), ("report", 1)]
