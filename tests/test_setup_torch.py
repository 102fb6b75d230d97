"""`make setup`'s plan (platform/launch/torch_install.py): on a machine without an NVIDIA driver it
is what setup always did (python3.11, a plain venv, `pip install torch==2.13.0`); with a driver it
keeps an interpreter's CUDA torch (a venv with --system-site-packages) or installs the CUDA build the
driver runs; a Python it cannot use is refused with one line and exit status 2.

The machines are posed through the plan's probes (interpreter versions, an interpreter's torch,
nvidia-smi's CUDA version); the real probes are checked on this machine.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from moeforge.platform.launch import torch_install
from moeforge.platform.launch.torch_install import Probes, SetupError, TorchBuild, main, make_plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "platform", "launch", "torch_install.py")
INDEX = "https://download.pytorch.org/whl"
# What the environment could set for make (a user's settings, or the make running this suite)
MAKE_SETTINGS = ("PYTHON", "SYSTEM_PYTHON", "TORCH_VERSION", "TORCH_CUDA", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")


def machine(pythons: dict, torches: dict | None = None, driver=None) -> Probes:
    """Probes of a posed machine: interpreter -> (major, minor), interpreter -> TorchBuild, the
    driver's CUDA version (None: no driver). Records which interpreters' torch was asked for."""
    torches = torches or {}
    probes = Probes(
        python=lambda cmd: pythons.get(cmd),
        torch=lambda cmd: probes.asked.append(cmd) or torches.get(cmd),
        driver_cuda=lambda: driver,
    )
    probes.asked = []
    return probes


def test_cpu_machine_plan_is_what_setup_always_did():
    probes = machine(
        {"python3.11": (3, 11), "python3.12": (3, 12)}, {"python3.11": TorchBuild("2.13.0", (13, 0))}
    )
    plan = make_plan("2.13.0", probes=probes)
    assert plan.venv_command(".venv") == ["python3.11", "-m", "venv", ".venv"]
    assert plan.torch_requirement == ["torch==2.13.0"]  # pinned, and no CUDA index
    assert not plan.system_site_packages and plan.kept_torch is None
    assert probes.asked == []  # without a driver nobody's torch is kept, so none is looked at


def test_this_machine_gets_the_cpu_plan():
    """The real probes, here (no NVIDIA driver): the plan `make setup` follows on this machine."""
    if torch_install.probe_driver_cuda() is not None:
        pytest.skip("this machine has an NVIDIA driver")
    out = subprocess.run(
        [sys.executable, SCRIPT, "plan", ".venv"], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert "no NVIDIA driver" in out
    assert "venv:    python3.11 -m venv .venv\n" in out
    assert "torch:   .venv/bin/python -m pip install -q --no-compile torch==2.13.0  (when .venv has no torch)" in out


def test_gpu_machine_keeps_the_cuda_torch_an_interpreter_has():
    probes = machine(
        {"python3.11": (3, 11), "python3.12": (3, 12)},
        {"python3.11": TorchBuild("2.13.0", None), "python3.12": TorchBuild("2.12.1+cu128", (12, 8))},
        driver=(12, 9),
    )
    plan = make_plan("2.13.0", probes=probes)
    assert plan.venv_command(".venv") == ["python3.12", "-m", "venv", "--system-site-packages", ".venv"]
    assert plan.kept_torch == TorchBuild("2.12.1+cu128", (12, 8)) and plan.torch_requirement == []
    assert "2.12.1+cu128 (CUDA 12.8) of python3.12, kept" in plan.describe(".venv")


def test_the_torch_floor_is_pyprojects():
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        assert f'"torch>={torch_install._dotted(torch_install.torch_floor())}' in f.read()
    assert torch_install.torch_floor() > (2, 3)


@pytest.mark.parametrize(
    "torch_build",
    [
        TorchBuild("2.13.0+cu132", (13, 2)),  # newer CUDA than the driver runs
        TorchBuild("2.3.1+cu121", (12, 1)),  # older than pyproject.toml's torch floor: pip would replace it
        TorchBuild("2.13.0+cpu", None),
    ],
)
def test_gpu_machine_installs_the_build_the_driver_runs(torch_build):
    probes = machine({"python3.11": (3, 11)}, {"python3.11": torch_build}, driver=(13, 1))
    plan = make_plan("2.13.0", probes=probes)
    assert plan.venv_command(".venv") == ["python3.11", "-m", "venv", ".venv"]
    assert plan.kept_torch is None
    assert plan.torch_requirement == ["torch==2.13.0", "--index-url", f"{INDEX}/cu130"]


@pytest.mark.parametrize("driver, build", [((12, 8), "cu126"), ((13, 0), "cu130"), ((13, 4), "cu132")])
def test_gpu_machine_without_a_torch_picks_the_newest_build_the_driver_runs(driver, build):
    probes = machine({"python3.11": None, "python3.12": (3, 12)}, driver=driver)
    plan = make_plan("2.13.0", probes=probes)
    assert plan.python == "python3.12"  # 3.12 is accepted on a GPU machine
    assert plan.torch_requirement == ["torch==2.13.0", "--index-url", f"{INDEX}/{build}"]
    # a named build is installed even where a CUDA torch could be kept
    kept = machine({"python3.11": (3, 11)}, {"python3.11": TorchBuild("2.13.0+cu126", (12, 6))}, driver)
    named = make_plan("2.13.0", cuda="cu126", probes=kept)
    assert not named.system_site_packages and named.torch_requirement[-1] == f"{INDEX}/cu126"


NVIDIA_SMI_HEADER = """\
Mon Dec  7 10:00:00 2026
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 580.65.06              Driver Version: 580.65.06      CUDA Version: 13.0     |
|-----------------------------------------+------------------------+----------------------+
"""


def test_the_driver_cuda_version_is_read_from_nvidia_smi():
    assert torch_install.parse_driver_cuda(NVIDIA_SMI_HEADER) == (13, 0)
    assert torch_install.parse_driver_cuda(NVIDIA_SMI_HEADER.replace("13.0", "12.8")) == (12, 8)
    assert torch_install.parse_driver_cuda("NVIDIA-SMI has failed because it couldn't communicate") is None


def test_the_real_probes_on_a_driver_whose_interpreter_has_a_cpu_torch(tmp_path):
    """The script with its real probes, an nvidia-smi on PATH that prints a driver's header, and this
    suite's interpreter (Python 3.11 with a CPU torch, which is not kept): the CUDA build is installed."""
    import torch

    if torch.version.cuda:
        pytest.skip("this suite's torch is a CUDA build, which the plan would keep")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\ncat <<'EOF'\n{NVIDIA_SMI_HEADER}EOF\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        [sys.executable, SCRIPT, "plan", ".venv", "--python", sys.executable],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    cu130 = f"torch==2.13.0 --index-url {INDEX}/cu130"
    assert proc.stdout.splitlines() == [
        "machine: NVIDIA driver for CUDA 13.0: GPU setup",
        f"python:  {sys.executable} (Python {sys.version_info[0]}.{sys.version_info[1]})",
        f"venv:    {sys.executable} -m venv .venv",
        f"torch:   .venv/bin/python -m pip install -q --no-compile {cu130}  (when .venv has no torch)",
    ]


def test_a_driver_older_than_every_build_is_refused():
    with pytest.raises(
        SetupError, match=r"the NVIDIA driver supports CUDA 12\.4, older than every CUDA build"
    ):
        make_plan("2.13.0", probes=machine({"python3.11": (3, 11)}, driver=(12, 4)))


@pytest.mark.parametrize(
    "python, version, driver, message",
    [
        (
            "python3.10",
            (3, 10),
            None,
            "setup: PYTHON=python3.10 is Python 3.10; setup without an NVIDIA driver needs Python 3.11",
        ),
        (
            "python3.12",
            (3, 12),
            None,
            "setup: PYTHON=python3.12 is Python 3.12; setup without an NVIDIA driver needs Python 3.11",
        ),
        (
            "python3.13",
            (3, 13),
            (13, 0),
            "setup: PYTHON=python3.13 is Python 3.13; setup with an NVIDIA driver needs Python 3.11 or 3.12",
        ),
        ("python3.11", None, None, "setup: PYTHON=python3.11 does not run here"),
    ],
)
def test_an_unsupported_python_is_refused_with_one_line(capsys, python, version, driver, message):
    probes = machine({python: version}, driver=driver)
    assert main(["venv", ".venv", "--python", python], probes=probes) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == message + "\n"


def test_no_usable_python_is_refused_with_one_line(capsys):
    assert main(["plan"], probes=machine({"python3.11": None, "python3.12": (3, 12)})) == 2
    assert capsys.readouterr().err == (
        "setup: no Python 3.11 runs here (python3.11); setup without an NVIDIA driver needs one "
        "(name it with PYTHON=...)\n"
    )


def test_the_script_refuses_in_one_line_without_a_traceback(tmp_path):
    """As the Makefile runs it: a plain script, exit status 2, one line, and no venv made."""
    proc = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "venv",
            str(tmp_path / "venv"),
            "--python",
            str(tmp_path / "no-such-python"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2
    assert (
        proc.stdout == ""
        and proc.stderr == f"setup: PYTHON={tmp_path / 'no-such-python'} does not run here\n"
    )
    assert not (tmp_path / "venv").exists()


def test_the_makefile_runs_the_plan_and_no_longer_sets_the_accelerator():
    """`make -n setup` into a venv that does not exist: the script makes the venv and installs torch;
    nothing exports DS_ACCELERATOR (each worker chooses it from its device)."""
    proc = subprocess.run(
        ["make", "--no-print-directory", "-n", "setup", "VENV=/nonexistent/moeforge-venv"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k not in MAKE_SETTINGS},
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert (
        lines[0]
        == "python3 platform/launch/torch_install.py --torch-version 2.13.0 venv /nonexistent/moeforge-venv"
    )
    assert (
        "python3 platform/launch/torch_install.py --torch-version 2.13.0 torch /nonexistent/moeforge-venv"
        in lines
    )
    with open(os.path.join(REPO, "Makefile")) as f:
        assert "DS_ACCELERATOR" not in f.read()
