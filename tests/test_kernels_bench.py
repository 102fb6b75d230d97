"""`moeforge-bench kernels` runs end to end on CPU with a tiny shape list (the torch twins; timings
are printed and written, never asserted), and refuses bad input in one line."""

from __future__ import annotations

import json

import torch
from moeforge.jobs.bench import main

TINY = [
    "device=cpu",
    "m=32",
    "gemms=[[t_gemm,256,128]]",
    "large_gemms=[t_gemm]",
    "linears=[t_gemm]",
    "experts=[[t_exp,128,128]]",
    "expert_counts=[3]",
    "expert_rows=70",
    "quant_rows=64",
    "quant_cols=256",
    "cpu_shrink=1",
    "cpu_reps=1",
]


def test_kernel_bench_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench" / "kernels.json"
    memory = "activation_memory.stacks=[{model: tiny, layers: 2, batch: 1, seq: 64}]"
    assert main(["kernels", *TINY, memory, f"output={out}"]) == 0
    table = capsys.readouterr().out
    assert "fp8_gemm" in table and "bf16_matmul" in table and "% of copy bandwidth" in table
    assert "activation memory kept for backward" in table
    report = json.loads(out.read_text())
    memory_rows = report["activation_memory"]["rows"]
    assert [(r["stack"], r["blocks"], r["tokens"], r["precision"]) for r in memory_rows] == [
        ("tiny", 2, 64, "bf16"),
        ("tiny", 2, 64, "fp8"),
    ]
    bf16, fp8 = memory_rows
    assert fp8["retained_ratio"] == fp8["retained_bytes"] / bf16["retained_bytes"] < 1
    assert fp8["saved_by_dtype"]["float8_e4m3fn"] > 0 and bf16["retained_ratio"] == 1.0
    rows = report["rows"]
    assert [r["name"] for r in rows if r["kind"] == "gemm"] == ["t_gemm"] * len([r for r in rows if r["kind"] == "gemm"])
    timed = {r["impl"]: r for r in rows if "ms" in r}
    for impl in ("bf16_matmul", "fp8_gemm", "fp8_gemm+act_quant", "fp8_grouped_gemm", "bf16_matmul_loop",
                 "copy_bf16", "act_quant", "act_quant_transpose", "weight_quant_fp32", "fp8_linear_fwd_bwd",
                 "bf16_linear_fwd_bwd"):
        assert timed[impl]["ms"] > 0, impl
    assert timed["fp8_gemm"]["m"] == 32 and timed["fp8_gemm"]["n"] == 256 and timed["fp8_gemm"]["k"] == 128
    assert timed["fp8_grouped_gemm"]["experts"] == 3 and timed["fp8_grouped_gemm"]["m"] == 70
    assert timed["act_quant"]["bytes"] == 64 * 256 * 3 + 64 * 2 * 4
    assert report["environment"]["backend"] == "torch"
    summary = report["summary"]
    assert set(summary["fp8_over_bf16_large_gemms"]) == {"t_gemm"}
    assert summary["goal_fp8_1p5x_bf16"] == "not measured on cpu"


def test_kernel_bench_bad_input_is_one_line(capsys, tmp_path):
    assert main(["kernels", "device=tpu", f"output={tmp_path}/k.json"]) == 2
    err = capsys.readouterr().err
    assert "device:" in err and err.count("\n") == 1
    assert main(["kernels", "large_gemms=[nope]", *TINY[:3], f"output={tmp_path}/k.json"]) == 2
    assert "large_gemms" in capsys.readouterr().err
    assert main(["kernels", *TINY, "activation_memory.precisions=[bf16]", f"output={tmp_path}/k.json"]) == 2
    assert "activation_memory.precisions" in capsys.readouterr().err
    assert main(["nosuchsuite"]) == 2
    assert "unknown suite" in capsys.readouterr().err


def test_yaml_defaults_equal_the_dataclass_defaults():
    """The GPU script runs without Hydra on the dataclass defaults: they must be the YAML's."""
    from pathlib import Path

    import yaml
    from moeforge.platform.bench.kernel_timing import KernelBenchConfig

    path = Path(__file__).resolve().parents[1] / "conf" / "bench_kernels.yaml"
    values = yaml.safe_load(path.read_text())
    values.pop("activation_memory")  # the model-side section, read by platform/bench/kernels.py
    assert KernelBenchConfig.from_dict(values) == KernelBenchConfig()


def test_gpu_check_script_parses():
    """kernels/gpu_check.sh runs only on a GPU machine: here, at least its syntax."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "kernels" / "gpu_check.sh"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_gpu_rows_summary_and_labels(monkeypatch):
    """The GPU-only parts of the benchmark that run without one: the launch-config labels, DeepGEMM
    reported as unavailable when it cannot be imported, and the summary against other FP8 GEMMs."""
    import sys

    from moeforge.kernels.triton_gemm import GPU_CONFIGS
    from moeforge.platform.bench import kernel_timing

    labels = [kernel_timing.config_label(c) for c in GPU_CONFIGS]
    assert labels[0] == "128x128w4ws/s4" and len(set(labels)) == len(labels)
    assert all(len(f"fp8_gemm[{label}]") <= 24 for label in labels)  # the table's impl column

    monkeypatch.setitem(sys.modules, "deep_gemm", None)  # import fails
    assert "not installed" in kernel_timing._attempt(kernel_timing._deep_gemm(None, None, None, None))

    cfg = kernel_timing.KernelBenchConfig(
        device="cpu", gemms=[["t", 256, 128]], large_gemms=["t"], linears=["t"]
    )
    gemm = {"kind": "gemm", "name": "t", "m": 8, "n": 256, "k": 128}
    rows = [
        {**gemm, "impl": "bf16_matmul", "ms": 2.0, "tflops": 100.0},
        {**gemm, "impl": "fp8_gemm", "ms": 1.0, "tflops": 200.0},
        {**gemm, "impl": "scaled_mm_rowwise", "ms": 1.0, "tflops": 250.0},
        {**gemm, "impl": "scaled_mm_blockwise", "error": "RuntimeError: not supported"},
        {**gemm, "impl": "deep_gemm", "error": "deep_gemm is not installed"},
        {"kind": "quant", "name": "copy_bf16", "m": 8, "k": 128, "impl": "copy_bf16", "bytes": 1, "ms": 1.0, "gbps": 10.0},
        {"kind": "quant", "name": "act_quant", "m": 8, "k": 128, "impl": "act_quant", "bytes": 1, "ms": 1.0, "gbps": 9.0},
    ]
    summary = kernel_timing._summary(rows, cfg, "cpu")
    assert summary["fp8_over_bf16_large_gemms"] == {"t": 2.0}
    assert summary["fp8_over_other_fp8"] == {"scaled_mm_rowwise": {"t": 0.8}}
    report = {"rows": rows, "summary": summary,
              "environment": {"device": "cpu", "gpu": None, "backend": "torch", "torch": torch.__version__}}
    table = kernel_timing.format_table(report)
    assert "fp8_gemm / scaled_mm_rowwise" in table and "deep_gemm is not installed" in table
