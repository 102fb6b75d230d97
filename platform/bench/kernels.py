"""`moeforge-bench kernels`: the FP8 kernel benchmark (`moeforge.platform.bench.kernel_timing`) and, beside it, the
activation memory the FP8 recipe keeps for backward over whole layer stacks
(`platform.bench.activation_memory.measure_stacks`), fp8 against bf16, in one table and one JSON report.

The kernel part needs nothing of the model and also runs without Hydra on a GPU machine
(`python -m moeforge.platform.bench.kernel_timing`; gpu_check's bench step runs it shape by shape);
the memory part builds models, and its `activation_memory` block in conf/bench_kernels.yaml is read
here and not by the kernel benchmark.
"""

from __future__ import annotations

from moeforge.platform.bench.activation_memory import ActivationMemoryConfig, format_rows, measure_stacks
from moeforge.platform.bench.kernel_timing import KernelBenchConfig, format_table, run_benchmark
from moeforge.platform.bench.report import write_report
from moeforge.platform.config.builder import build


def run_job(values: dict) -> str:
    """Config dict (conf/bench_kernels.yaml) -> run both parts, write the JSON report, return the table."""
    values = dict(values)
    memory_cfg = build(
        ActivationMemoryConfig, values.pop("activation_memory", None) or {}, "activation_memory"
    )
    kernel_cfg = KernelBenchConfig.from_dict(values)
    report = run_benchmark(kernel_cfg)
    text = format_table(report)
    if memory_cfg.enabled:
        rows = measure_stacks(memory_cfg, log=lambda _line: None)
        report["activation_memory"] = {"goal_ratio": memory_cfg.goal_ratio, "rows": rows}
        text += "\n\n" + format_rows(rows, memory_cfg.goal_ratio)
    return write_report(kernel_cfg.output, report, text)
