"""`moeforge-bench kernels` runs end to end on CPU with a tiny shape list (the torch twins; timings
are printed and written, never asserted), and refuses bad input in one line."""

from __future__ import annotations

import json

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
    assert main(["kernels", *TINY, f"output={out}"]) == 0
    table = capsys.readouterr().out
    assert "fp8_gemm" in table and "bf16_matmul" in table and "% of copy bandwidth" in table
    report = json.loads(out.read_text())
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
    assert main(["nosuchsuite"]) == 2
    assert "unknown suite" in capsys.readouterr().err


def test_yaml_defaults_equal_the_dataclass_defaults():
    """The GPU script runs without Hydra on the dataclass defaults: they must be the YAML's."""
    from pathlib import Path

    import yaml
    from moeforge.kernels.bench_kernels import KernelBenchConfig

    path = Path(__file__).resolve().parents[1] / "conf" / "bench_kernels.yaml"
    assert KernelBenchConfig.from_dict(yaml.safe_load(path.read_text())) == KernelBenchConfig()
