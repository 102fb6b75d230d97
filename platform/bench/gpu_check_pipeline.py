"""The pipeline step of gpu_check: one pipeline rank's whole run on the device.

A single GPU cannot run two NCCL ranks, but one rank (1F1B, pp = dp = 1) in a one-process group
runs everything of the pipeline path except transfers: the NCCL backend's waits (the host runs on),
the kernel warm-up and its barrier before step 1, ZeRO-1 through RankEngine, and the step
timeline read from CUDA events (`platform.engine.step_clock.CudaEventClock`) instead of the host clock.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any

from moeforge.platform.bench.gpu_check_results import Results, one_rank_group
from moeforge.platform.bench.gpu_check_train import SEED

PIPELINE = {
    "gpu": {"seq_len": 256, "global_batch": 8, "microbatches": 4, "steps": 4, "precision": "fp8"},
    "tiny": {"seq_len": 16, "global_batch": 4, "microbatches": 2, "steps": 2, "precision": "fp32"},
}


def pipeline_step(res: Results, device, size: str, **_: Any) -> bool:
    """run_pipeline_training on one rank of a one-process group (NCCL on CUDA, gloo on CPU) for a
    few steps of the tiny model. Checks: the run completes with finite losses; the step clock is
    CUDA events on CUDA (the host clock on CPU); every compute record of the gathered timeline has a
    positive duration inside the step's span; the recorded bubble lies in [0, 1)."""
    from moeforge.platform.config.presets import preset_values
    from moeforge.platform.config.train import TrainConfig
    from moeforge.platform.engine.step_clock import clock_for
    from moeforge.platform.launch.accelerator import bind_device, use_accelerator_for

    p = PIPELINE[size]
    use_accelerator_for(device)  # before deepspeed is imported
    device = bind_device(device)
    with tempfile.TemporaryDirectory(prefix="moeforge-gpu-check-") as tmp:
        run_dir = os.path.join(tmp, "run")
        cfg = TrainConfig.from_dict({
            "model": {**preset_values("model", "tiny"), "seq_len": p["seq_len"]},
            "parallel": {"schedule": "1f1b", "pp": 1, "dp": 1, "microbatches": p["microbatches"],
                         "zero_stage": 1},
            "resources": {"gpus_per_worker": 1 if device.type == "cuda" else 0},
            "precision": preset_values("precision", p["precision"]),
            "data": {"source": "synthetic", "global_batch": p["global_batch"], "seed": SEED},
            "run": {"name": "gpu_check_pipeline", "dir": run_dir, "seed": SEED, "steps": p["steps"],
                    "log_every": 1, "eval_every": 0},
            "tracking": {"log_timeline": True},
        })  # fmt: skip
        with one_rank_group(device, tmp) as backend:
            from moeforge.platform.train.pipeline import run_pipeline_training

            log: list[str] = []
            summary = run_pipeline_training(cfg, 0, 1, log=log.append, device=device)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            metrics = [json.loads(line) for line in f if line.strip()]
        with open(os.path.join(run_dir, "timeline.json")) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    clock = type(clock_for(device)).__name__
    compute = [e for e in events if e["cat"] in ("F", "B", "W", "BW", "FB")]
    span = max((e["ts"] + e["dur"] for e in events), default=0.0)
    losses = [m["loss"] for m in metrics]
    bubble = metrics[-1].get("bubble_fraction") if metrics else None
    checks = {
        "completed": summary.get("status") == "completed" and len(losses) == p["steps"],
        "finite_losses": all(math.isfinite(x) for x in losses),
        "clock": clock == ("CudaEventClock" if device.type == "cuda" else "HostClock"),
        "timeline": bool(compute) and all(0 < e["dur"] and e["ts"] + e["dur"] <= span for e in compute),
        "bubble": bubble is not None and 0.0 <= bubble < 1.0,
    }
    passed = all(checks.values())
    res.write(
        "pipeline",
        "run",
        device=str(device),
        backend=backend,
        clock=clock,
        steps=len(losses),
        losses=losses,
        tokens_per_s=summary.get("tokens_per_s"),
        bubble_fraction=bubble,
        compute_records=len(compute),
        step_span_ms=span / 1e3,
        warm_up=[line for line in log if line.startswith("kernel warm-up")],
        checks=checks,
        passed=passed,
    )
    return passed
