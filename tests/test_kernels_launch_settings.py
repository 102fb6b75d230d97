"""Launch settings of the Triton kernels, checked on CPU: the SMs left to communication size every
persistent grid, warp-specialized configs stay out of autotuning unless switched on, and a Triton
older than the floor is refused with one message while the torch twins keep working."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from moeforge.kernels import backend, settings, triton_version
from moeforge.kernels.settings import persistent_programs, reserved_sms, reserving_sms, set_reserved_sms


@pytest.fixture(autouse=True)
def _restore_reserved_sms():
    saved = reserved_sms()
    yield
    set_reserved_sms(saved)


# ---- SMs left to communication ---------------------------------------------------------------------
def test_default_persistent_grid_is_one_program_per_sm():
    assert reserved_sms() == 0
    assert persistent_programs(132, 10_000) == 132
    assert persistent_programs(132, 7) == 7  # never more programs than tiles


def test_reserved_sms_shrink_every_persistent_grid():
    set_reserved_sms(20)  # DeepSeek-V3's split of an H800
    assert persistent_programs(132, 10_000) == 112
    assert persistent_programs(132, 50) == 50
    assert persistent_programs(16, 10_000) == 1  # at least one program, whatever is reserved
    assert persistent_programs(132, 10_000, num_programs=7) == 7  # an explicit grid is taken as given


def test_reserving_sms_restores_the_previous_value():
    set_reserved_sms(4)
    with reserving_sms(24):
        assert persistent_programs(132, 10_000) == 108
    assert reserved_sms() == 4


@pytest.mark.parametrize("bad", [-1, 2.5, True, "20"])
def test_reserved_sms_refuses_bad_values(bad):
    with pytest.raises(ValueError, match="reserved SMs"):
        set_reserved_sms(bad)


def test_gemm_grids_read_the_setting(monkeypatch):
    """The GEMM wrappers size their CUDA grids through persistent_programs (SM count stubbed)."""
    from moeforge.kernels import triton_gemm

    monkeypatch.setattr(triton_gemm, "_num_sms", lambda device: 132)
    cuda = torch.device("cuda", 0)
    assert triton_gemm._programs(cuda, 10_000, None) == 132
    with reserving_sms(20):
        assert triton_gemm._programs(cuda, 10_000, None) == 112
        assert triton_gemm._programs(cuda, 10_000, 5) == 5
        assert triton_gemm._programs(torch.device("cpu"), 10_000, None) == triton_gemm.INTERPRET_PROGRAMS


# ---- warp specialization ---------------------------------------------------------------------------
def _ws(configs) -> list[bool]:
    return [bool(c.kwargs["WARP_SPECIALIZE"]) for c in configs]


def test_autotuning_leaves_warp_specialized_configs_out_by_default(monkeypatch):
    from moeforge.kernels.triton_gemm import GPU_CONFIGS, autotune_configs

    monkeypatch.delenv(settings.WARP_SPECIALIZE_ENV, raising=False)
    assert autotune_configs() and not any(_ws(autotune_configs()))
    assert any(_ws(GPU_CONFIGS))  # still there for the GPU check and the benchmark to run by name


def test_switch_puts_warp_specialized_configs_into_autotuning(monkeypatch):
    from moeforge.kernels.triton_gemm import GPU_CONFIGS, autotune_configs

    monkeypatch.setenv(settings.WARP_SPECIALIZE_ENV, "1")
    assert autotune_configs() == GPU_CONFIGS and any(_ws(autotune_configs()))
    monkeypatch.setenv(settings.WARP_SPECIALIZE_ENV, "yes")
    with pytest.raises(ValueError, match=settings.WARP_SPECIALIZE_ENV):
        autotune_configs()


# ---- the Triton version floor ----------------------------------------------------------------------
@pytest.mark.parametrize("version", ["3.4.0", "3.4.0+git1a2b3c", "3.5.1", "3.10.0", "4.0"])
def test_versions_at_or_above_the_floor_pass(version):
    assert triton_version.triton_version_problem(version) is None


@pytest.mark.parametrize("version", ["3.3.1", "3.0.0", "2.3.1", "3.3.0+gitdeadbeef"])
def test_older_versions_are_refused_naming_both_versions(version):
    message = triton_version.triton_version_problem(version)
    assert message is not None
    assert f"installed: triton {version}" in message and "triton >= 3.4" in message


def test_too_old_triton_makes_the_public_api_use_the_twins_and_says_why_once(monkeypatch):
    from moeforge.kernels.quant import act_quant
    from moeforge.kernels.quant_torch import act_quant_torch

    monkeypatch.setattr(triton_version, "installed_triton_version", lambda: "3.3.1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # would route CPU tensors to Triton if it were usable
    backend.triton_unavailable_reason.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert backend.triton_available() is False
            assert backend.use_triton(torch.empty(1)) is False
            x = torch.randn(5, 256)
            got, want = act_quant(x), act_quant_torch(x)
            assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(got[1], want[1])
        said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(said) == 1 and "installed: triton 3.3.1" in said[0] and "torch twins" in said[0]
        with backend.use_backend("triton"), pytest.raises(RuntimeError, match="installed: triton 3.3.1"):
            backend.use_triton(torch.empty(1))
    finally:
        backend.triton_unavailable_reason.cache_clear()


def test_importing_the_triton_kernels_with_a_too_old_triton_raises_one_clear_error():
    script = (
        "import moeforge.kernels.triton_version as v\n"
        "v.installed_triton_version = lambda: '3.3.1'\n"
        "try:\n"
        "    import moeforge.kernels.triton_gemm\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "installed: triton 3.3.1" in proc.stdout and "triton >= 3.4" in proc.stdout
