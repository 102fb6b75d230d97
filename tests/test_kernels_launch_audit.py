"""The Triton launch path, run by Triton's CPU interpreter (moeforge.platform.bench.launch_audit):

- autotuning keys: 50 distinct row counts through every autotuned entry point present at most a
  handful of distinct keys per kernel (one; fp8_gemm one per row class), so a GPU run under expert
  parallelism tunes each kernel once per shape instead of on almost every call. The keys are
  computed on the real launch path from the same key list the GPU autotuner is built with, so
  putting a row count back into a key fails here;
- host reads: one forward and backward of the FP8 grouped experts (and of an FP8Linear) on the
  Triton path reads nothing back from the device, while the torch twins' host read is seen.

TRITON_INTERPRET must be set before triton is imported, hence the subprocess.
"""

from __future__ import annotations

import pytest
from moeforge.kernels.triton_launch import ROW_BUCKETS
from moeforge.platform.bench.launch_audit import ROW_SWEEP
from triton_interpreter import run_interpreted

AUTOTUNED = ("act_quant", "act_quant_transpose", "fp8_gemm", "fp8_grouped_gemm", "fp8_wgrad_grouped_gemm")
DATA_DEPENDENT = ("M", "T", "TILES", "KB_ALL")  # row / token counts: never in a key


@pytest.fixture(scope="module")
def audit() -> dict:
    return run_interpreted(["-m", "moeforge.platform.bench.launch_audit"], "launch_audit", timeout=600)


def test_the_sweep_has_fifty_distinct_row_counts():
    assert len(set(ROW_SWEEP)) == 50


@pytest.mark.parametrize("kernel", AUTOTUNED)
def test_a_row_sweep_presents_a_handful_of_autotuning_keys(audit, kernel):
    entry = audit["key_sweep"][kernel]
    assert entry["autotuned"] and entry["launches"] >= len(ROW_SWEEP)
    most = len(ROW_BUCKETS) if kernel == "fp8_gemm" else 1
    assert 1 <= len(entry["keys"]) <= most, entry["keys"]


@pytest.mark.parametrize("kernel", AUTOTUNED)
def test_the_gpu_autotuner_keys_on_no_data_dependent_size(audit, kernel):
    keys = audit["tuner_keys"][kernel]
    assert keys and not set(keys) & set(DATA_DEPENDENT), keys


@pytest.mark.parametrize("case", ["fp8_experts", "fp8_experts_v3", "fp8_linear"])
def test_forward_and_backward_read_nothing_back_on_the_triton_path(audit, case):
    assert audit["host_reads"][case] == {}


def test_the_host_read_counter_sees_the_twins_read(audit):
    """Control: the torch twins split on host sizes, so the same step reads the counts once."""
    reads = audit["host_reads"]["control:fp8_experts_torch_twin"]
    assert sum(reads.values()) == 1 and all(name.startswith("tolist grouped_experts.py") for name in reads)
