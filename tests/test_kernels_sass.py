"""Every Triton kernel compiles for Hopper (sm_90) on a machine without a GPU, and the compiled GEMMs
use what makes them Hopper kernels: the e4m3 tensor-core instruction (QGMMA), TMA bulk copies
completing on mbarriers, a persistent tile loop, and (in the warp-specialized configs) a producer
warp group that hands its registers to two consumer warp groups, all without local-memory spills.
The compiled path has rules the interpreter does not check (only tl.constexpr module globals, for
one), so this is the CPU stand-in for "it builds on the GPU". Triton's wheel carries ptxas,
cuobjdump and nvdisasm."""

from __future__ import annotations

import functools

import pytest
import triton
from moeforge.kernels.triton_gemm import GPU_CONFIGS, PLAIN_CONFIG, WS_CONFIG
from moeforge.platform.bench.sass_report import CONFIGS, KERNELS, compile_report

GEMMS = ("fp8_gemm", "fp8_grouped_gemm", "fp8_wgrad_grouped_gemm")


@functools.cache
def report(name: str, index: int) -> dict:
    return compile_report(name, CONFIGS[name][index])


def _spill_free(r: dict) -> None:
    assert r["LDL"] == 0 and r["STL"] == 0, r["config"]
    assert r["registers"] and r["registers"] <= 255


@pytest.mark.parametrize("name", sorted(set(KERNELS) - set(GEMMS)))
def test_quant_kernel_compiles_for_sm90_without_spills(name):
    _spill_free(report(name, 0))


@pytest.mark.parametrize("name", GEMMS)
@pytest.mark.parametrize("variant", ["warp_specialized", "plain"])
def test_gemm_emits_hopper_features(name, variant):
    config = WS_CONFIG if variant == "warp_specialized" else PLAIN_CONFIG
    r = report(name, GPU_CONFIGS.index(config))
    _spill_free(r)
    assert r["QGMMA"] > 0 and r["HMMA"] == 0  # e4m3 wgmma, not a fallback
    # Operands by TMA (the copy engine) into shared memory, completion tracked by mbarriers; no
    # cp.async left (the scales are ordinary loads).
    assert r["UTMALDG"] > 0 and r["tma_loads"] > 0 and r["LDGSTS"] == 0
    assert r["SYNCS"] > 0 and r["mbarrier"] > 0
    # Persistent: the kernel strides its tile loop by the grid size, around the K loop.
    assert r["reads_grid_size"] and r["loops"] >= 2
    if name == "fp8_gemm":  # C leaves through a TMA store too (16-byte aligned row pitch)
        assert r["UTMASTG"] > 0 and r["tma_stores"] > 0
    if variant == "warp_specialized":
        # A producer warp group (setmaxnreg.dec) and two consumer warp groups (setmaxnreg.inc):
        # 12 warps from num_warps=4.
        assert r["setmaxnreg_dec"] > 0 and r["setmaxnreg_inc"] > 0 and r["USETMAXREG"] > 0
        assert r["warps"] == 3 * config.num_warps
    else:
        assert r["setmaxnreg_dec"] == r["setmaxnreg_inc"] == 0 and r["warps"] == config.num_warps


@pytest.mark.parametrize("name", GEMMS)
def test_every_gemm_launch_config_is_spill_free(name):
    """The autotuner may keep any of them."""
    for index in range(len(GPU_CONFIGS)):
        r = report(name, index)
        _spill_free(r)
        assert r["QGMMA"] > 0 and r["UTMALDG"] > 0


def test_fp8_gemm_with_row_scaled_b_and_unaligned_pitch():
    """The other branches of fp8_gemm: 1x128 scales on b (a vector of them per tile) and masked
    pointer stores instead of the TMA store."""
    config = triton.Config({**WS_CONFIG.kwargs, "B_ROW_SCALES": True, "C_TMA": False},
                           num_warps=WS_CONFIG.num_warps, num_stages=WS_CONFIG.num_stages)
    r = compile_report("fp8_gemm", config)
    _spill_free(r)
    assert r["QGMMA"] > 0 and r["UTMALDG"] > 0 and r["UTMASTG"] == 0 and r["setmaxnreg_inc"] > 0
