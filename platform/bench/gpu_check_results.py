"""The results file the gpu_check steps append to, what they share, and the env step.

Results writes each line flushed and synced at once: a step stopped by its `timeout` keeps every line
written before. The helpers are the device a step runs on, its synchronization before a clock is
read, the peak MFU is measured against (env reports it beside the versions), and the time since the
process started (what --budget-s counts).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any

_STARTED = time.monotonic()  # the process's start, near enough: --budget-s counts from here

H100_H200_BF16_PEAK_TFLOPS = 989.0  # dense BF16, H100 / H200 SXM datasheet
PEAK_BASIS = "dense BF16 datasheet peak of an H100/H200 SXM (989 TFLOP/s), for bf16 and fp8 alike"


class Results:
    """Appends one JSON object per line to `path`, each flushed and synced as it is written."""

    def __init__(self, path: str) -> None:
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)

    def write(self, step: str, what: str, **fields: Any) -> dict:
        """One line {"step", "what", **fields, "at"}; returns it."""
        line = {"step": step, "what": what, **fields, "at": round(time.time(), 3)}
        text = json.dumps(line, default=_plain)
        with open(self.path, "a") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        return line

    def read(self) -> list[dict]:
        """Every whole line written so far (a torn last line is skipped)."""
        if not os.path.exists(self.path):
            return []
        lines = []
        with open(self.path) as f:
            for raw in f:
                with contextlib.suppress(json.JSONDecodeError):
                    lines.append(json.loads(raw))
        return lines


def _plain(value: Any) -> Any:
    """What json cannot write: torch dtypes and devices, tensors holding one value, paths."""
    if hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:
        return value.item()
    return str(value)


def finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def elapsed() -> float:
    return time.monotonic() - _STARTED


def choose_device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device: cuda or cpu, got {name!r}")
    return device


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device) -> float | None:
    """The peak MFU is measured against: 989 TFLOP/s (dense BF16) for an H100 or H200 SXM, None
    for any other device (MFU is then not reported)."""
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if ("H100" in name or "H200" in name) and "PCIe" not in name:
        return H100_H200_BF16_PEAK_TFLOPS
    return None


# ---- env -------------------------------------------------------------------------------------------


def env_step(res: Results, device, size: str, **_: Any) -> bool:
    """The device and the libraries this run uses."""
    import importlib.metadata
    import platform as std_platform

    import torch

    info: dict[str, Any] = {
        "device": str(device),
        "python": std_platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "peak_tflops": peak_tflops(device),
        "peak_basis": PEAK_BASIS,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
        )
    for package in ("triton", "deepspeed", "pydantic", "numpy", "tokenizers", "safetensors"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    from moeforge.kernels import settings
    from moeforge.kernels.backend import use_triton

    info["kernels"] = "triton" if use_triton(torch.empty(1, device=device)) else "torch"
    info["warp_specialize_autotuning"] = settings.warp_specialize_autotuning()
    res.write("env", "environment", **info)
    return True


@contextlib.contextmanager
def one_rank_group(device, directory: str):
    """A one-process torch.distributed group for `device` (NCCL on CUDA, gloo otherwise, a FileStore
    in `directory`) and the environment DeepSpeed reads (RANK, WORLD_SIZE, LOCAL_RANK; a launcher's
    values are kept); yields the backend's name and destroys the group afterwards."""
    import torch.distributed as dist

    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.FileStore(os.path.join(directory, "store"), 1), rank=0, world_size=1)
    try:
        yield backend
    finally:
        dist.destroy_process_group()
