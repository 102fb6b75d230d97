"""How `make setup` gets Python and torch: which interpreter makes the venv, whether the venv sees a
CUDA torch the machine already has, and which torch to install when it has none.

The Makefile runs this file with the system python before the venv exists, so it uses the standard
library only (no moeforge imports, nothing newer than Python 3.8):

    python3 platform/launch/torch_install.py plan         # print the plan; change nothing
    python3 platform/launch/torch_install.py venv .venv   # create the venv the plan says
    python3 platform/launch/torch_install.py torch .venv  # install torch into it, unless it has one

The plan:
- No NVIDIA driver (nvidia-smi missing or failing): Python 3.11, a plain venv, and
  `pip install torch==2.13.0` when the venv has no torch; pinned so that pip takes the CPU build
  where one is at hand, never a bare `torch`, which pulls a multi-GB CUDA build.
- A driver: Python 3.11 or 3.12. A plain venv never sees a torch installed outside it, so when one of
  these interpreters has a CUDA torch the driver can run (its CUDA no newer than the driver's, torch
  no older than pyproject.toml asks), the venv is made from it with --system-site-packages and that
  torch is kept.
  Otherwise a plain venv gets torch from the PyTorch wheel index of the newest CUDA build the
  driver can run.
- `--python` (the Makefile's PYTHON) names the only interpreter to consider; `--cuda` (TORCH_CUDA)
  names the CUDA build to install, which is then installed even where a CUDA torch could be kept.
A Python or driver setup cannot use is refused with one line and exit status 2.

The probes (an interpreter's version, its torch build, the driver's CUDA version) are arguments of
`make_plan`, so tests can pose as any machine.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

TORCH_VERSION = "2.13.0"
PYPROJECT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "pyproject.toml")
# pip without its bytecode step: `make setup` compiles the whole venv afterwards on every core at
# once, which takes half the time of pip's one-file-at-a-time compile.
PIP_INSTALL = ("-m", "pip", "install", "-q", "--no-compile")
CPU_PYTHONS = ((3, 11),)  # the CPU wheel setup installs is built for 3.11
GPU_PYTHONS = ((3, 11), (3, 12))
# CUDA builds of torch 2.13 on the PyTorch wheel index (cuXYZ); TORCH_CUDA picks another.
CUDA_BUILDS = ((12, 6), (13, 0), (13, 2))
TORCH_INDEX = "https://download.pytorch.org/whl"


class SetupError(Exception):
    """What setup cannot do on this machine, in one line."""


@dataclass
class TorchBuild:
    version: str  # torch.__version__, e.g. "2.13.0+cu130"
    cuda: tuple[int, int] | None  # torch.version.cuda, None for a CPU build


def _run(cmd: list[str], timeout: float) -> str | None:
    """`cmd`'s stdout, or None when it cannot run or fails."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _version(text: str) -> tuple[int, int] | None:
    match = re.match(r"\s*(\d+)\.(\d+)", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def probe_python(cmd: str) -> tuple[int, int] | None:
    """The (major, minor) version of interpreter `cmd`, or None when it does not run."""
    return _version(_run([cmd, "-c", "import sys; print(*sys.version_info[:2], sep='.')"], 60) or "")


def probe_torch(cmd: str) -> TorchBuild | None:
    """The torch interpreter `cmd` imports, or None when it has none."""
    out = _run([cmd, "-c", "import torch; print(torch.__version__); print(torch.version.cuda or '')"], 600)
    if out is None:
        return None
    lines = out.splitlines() + ["", ""]
    return TorchBuild(lines[0].strip(), _version(lines[1]))


def parse_driver_cuda(nvidia_smi: str) -> tuple[int, int] | None:
    """The CUDA version in nvidia-smi's header ("... Driver Version: 580.65  CUDA Version: 13.0 |")."""
    match = re.search(r"CUDA Version\s*:\s*(\d+)\.(\d+)", nvidia_smi)
    return (int(match.group(1)), int(match.group(2))) if match else None


def probe_driver_cuda() -> tuple[int, int] | None:
    """The CUDA version the NVIDIA driver supports, or None without a working nvidia-smi."""
    return parse_driver_cuda(_run(["nvidia-smi"], 60) or "")


@dataclass
class Probes:
    python: Callable[[str], tuple[int, int] | None] = probe_python
    torch: Callable[[str], TorchBuild | None] = probe_torch
    driver_cuda: Callable[[], tuple[int, int] | None] = probe_driver_cuda


@dataclass
class Plan:
    python: str  # the interpreter that makes the venv
    python_version: tuple[int, int]
    driver_cuda: tuple[int, int] | None  # None: no NVIDIA driver
    system_site_packages: bool  # the venv sees the interpreter's own (CUDA) torch
    kept_torch: TorchBuild | None  # that torch, when kept
    torch_requirement: list[str] = field(default_factory=list)  # pip arguments when the venv has no torch

    def venv_command(self, venv: str) -> list[str]:
        flags = ["--system-site-packages"] if self.system_site_packages else []
        return [self.python, "-m", "venv", *flags, venv]

    def describe(self, venv: str) -> str:
        major, minor = self.python_version
        if self.driver_cuda is None:
            machine = "no NVIDIA driver (nvidia-smi missing or failing): CPU setup"
        else:
            machine = f"NVIDIA driver for CUDA {_dotted(self.driver_cuda)}: GPU setup"
        lines = [
            f"machine: {machine}",
            f"python:  {self.python} (Python {major}.{minor})",
            f"venv:    {shlex.join(self.venv_command(venv))}",
        ]
        if self.kept_torch is not None:
            build = self.kept_torch
            lines.append(f"torch:   {build.version} (CUDA {_dotted(build.cuda)}) of {self.python}, kept")
        else:
            pip = [os.path.join(venv, "bin", "python"), *PIP_INSTALL, *self.torch_requirement]
            lines.append(f"torch:   {shlex.join(pip)}  (when {venv} has no torch)")
        return "\n".join(lines)


def torch_floor(pyproject: str = PYPROJECT) -> tuple[int, int]:
    """pyproject.toml's lowest torch ("torch>=X.Y"): pip would replace an older torch the venv sees."""
    try:
        with open(pyproject) as f:
            match = re.search(r'"torch>=(\d+)\.(\d+)', f.read())
    except OSError:
        match = None
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _dotted(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def _cuda_name(version: tuple[int, int]) -> str:
    return f"cu{version[0]}{version[1]}"


def torch_requirement(
    torch_version: str, driver: tuple[int, int] | None, cuda: str | None = None
) -> list[str]:
    """pip's arguments for torch: the pinned version, from the wheel index of a CUDA build the
    driver can run when there is a driver (`cuda` names one, e.g. "cu130")."""
    if driver is None:
        return [f"torch=={torch_version}"]
    if cuda is None:
        runnable = [v for v in CUDA_BUILDS if v <= driver]
        if not runnable:
            builds = " ".join(_cuda_name(v) for v in CUDA_BUILDS)
            raise SetupError(
                f"setup: the NVIDIA driver supports CUDA {_dotted(driver)}, older than every CUDA build of "
                f"torch {torch_version} ({builds}): update the driver, name a build with TORCH_CUDA=cuXYZ, "
                "or give Python 3.11 or 3.12 a CUDA torch (setup keeps it)"
            )
        cuda = _cuda_name(max(runnable))
    if not re.fullmatch(r"cu\d{3,}", cuda):
        raise SetupError(f"setup: TORCH_CUDA must name a CUDA build like cu130, got {cuda!r}")
    return [f"torch=={torch_version}", "--index-url", f"{TORCH_INDEX}/{cuda}"]


def _names(versions) -> str:
    return " or ".join(_dotted(v) for v in versions)


def make_plan(
    torch_version: str = TORCH_VERSION,
    python: str | None = None,
    cuda: str | None = None,
    probes: Probes | None = None,
) -> Plan:
    """The setup plan for this machine (see the module docstring); raises SetupError."""
    probes = probes or Probes()
    driver = probes.driver_cuda()
    supported = CPU_PYTHONS if driver is None else GPU_PYTHONS
    where = "without an NVIDIA driver" if driver is None else "with an NVIDIA driver"
    candidates = [python] if python else [f"python{_dotted(v)}" for v in supported]
    found = [(cmd, probes.python(cmd)) for cmd in candidates]
    found = [(cmd, version) for cmd, version in found if version is not None]
    if python:
        if not found:
            raise SetupError(f"setup: PYTHON={python} does not run here")
        version = found[0][1]
        if version not in supported:
            raise SetupError(
                f"setup: PYTHON={python} is Python {_dotted(version)}; setup {where} needs Python "
                f"{_names(supported)}"
            )
    usable = [(cmd, version) for cmd, version in found if version in supported]
    if not usable:
        raise SetupError(
            f"setup: no Python {_names(supported)} runs here ({' '.join(candidates)}); setup {where} "
            "needs one (name it with PYTHON=...)"
        )
    if driver is not None and cuda is None:  # a named CUDA build is installed, not looked for
        for cmd, version in usable:
            build = probes.torch(cmd)
            if (
                build is not None
                and build.cuda is not None
                and build.cuda <= driver
                and (_version(build.version) or (0, 0)) >= torch_floor()
            ):
                return Plan(cmd, version, driver, True, build)
    cmd, version = usable[0]
    return Plan(cmd, version, driver, False, None, torch_requirement(torch_version, driver, cuda))


def _call(cmd: list[str]) -> int:
    print(shlex.join(cmd), flush=True)
    return subprocess.call(cmd)


def main(argv: list[str] | None = None, probes: Probes | None = None) -> int:
    parser = argparse.ArgumentParser(description="moeforge setup: the venv's Python and torch")
    parser.add_argument("action", choices=("plan", "venv", "torch"))
    parser.add_argument("venv", nargs="?", default=".venv")
    parser.add_argument("--python", default=None, help="the only interpreter to consider")
    parser.add_argument("--torch-version", default=TORCH_VERSION)
    parser.add_argument("--cuda", default=None, help="the CUDA build to install, e.g. cu130")
    args = parser.parse_args(argv)
    probes = probes or Probes()
    try:
        if args.action == "torch":
            venv_python = os.path.join(args.venv, "bin", "python")
            if _run([venv_python, "-c", "import torch"], 600) is not None:
                return 0  # the venv has a torch (its own, or the interpreter's CUDA torch): kept
            requirement = torch_requirement(args.torch_version, probes.driver_cuda(), args.cuda)
            return _call([venv_python, *PIP_INSTALL, *requirement])
        plan = make_plan(args.torch_version, args.python, args.cuda, probes)
    except SetupError as err:
        print(err, file=sys.stderr)
        return 2
    if args.action == "plan":
        print(plan.describe(args.venv))
        return 0
    return _call(plan.venv_command(args.venv))


if __name__ == "__main__":
    sys.exit(main())
