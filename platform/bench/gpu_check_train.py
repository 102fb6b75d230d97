"""The train_bf16 and train_fp8 steps of gpu_check: the one-process loop timed step by step.

train_config builds the TrainConfig from the shipped presets without Hydra (the zero and generate
steps build theirs with it too). The loop is driven here, not through Trainer.train, so that
timing starts after the warm-up steps and every step's figures reach the file before the next starts.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from typing import Any

from moeforge.platform.bench.gpu_check_results import (
    PEAK_BASIS,
    Results,
    elapsed,
    finite_or_none,
    peak_tflops,
    sync,
)

SEED = 1234

# Per size: the training run of train_bf16 / train_fp8.
TRAIN = {
    "gpu": {"model": "small", "seq_len": 1024, "global_batch": 8, "microbatches": 2, "steps": 30,
            "warmup_steps": 10, "timed_after": 3},
    "tiny": {"model": "tiny", "seq_len": 16, "global_batch": 2, "microbatches": 1, "steps": 2,
             "warmup_steps": 1, "timed_after": 1},
}  # fmt: skip
TRAIN_LR, TRAIN_MIN_LR = 1.0e-3, 1.0e-4  # conf/experiment/small_1gpu_fp8.yaml's


def train_config(
    size: str,
    precision: str,
    device,
    run_dir: str,
    *,
    model: str | None = None,
    steps: int | None = None,
    seq_len: int | None = None,
    global_batch: int | None = None,
    microbatches: int | None = None,
    lr: float = TRAIN_LR,
    min_lr: float = TRAIN_MIN_LR,
    warmup_steps: int | None = None,
):
    """The TrainConfig of a one-process run from the shipped presets (conf/), without Hydra: the
    model preset with a shorter seq_len, parallel=single on the GPU when `device` is CUDA
    (resources.gpus_per_worker = 1), the precision preset, synthetic data."""
    from moeforge.platform.config.presets import preset_values
    from moeforge.platform.config.train import TrainConfig

    s = TRAIN[size]
    parallel = {
        **preset_values("parallel", "single"),
        "microbatches": microbatches or s["microbatches"],
    }
    optim = {
        **preset_values("optim", "adamw"),
        "lr": lr,
        "min_lr": min_lr,
        "warmup_steps": s["warmup_steps"] if warmup_steps is None else warmup_steps,
    }
    return TrainConfig.from_dict({
        "model": {**preset_values("model", model or s["model"]), "seq_len": seq_len or s["seq_len"]},
        "parallel": parallel,
        "resources": {"gpus_per_worker": 1 if device.type == "cuda" else 0},
        "precision": preset_values("precision", precision),
        "data": {"source": "synthetic", "global_batch": global_batch or s["global_batch"], "seed": SEED},
        "optim": optim,
        "run": {"name": f"gpu_check_{precision}", "dir": run_dir, "seed": SEED, "steps": steps or s["steps"]},
    })  # fmt: skip


def train_step(
    res: Results, device, size: str, precision: str, budget_s: float | None = None, **_: Any
) -> bool:
    """The reference loop for TRAIN[size]["steps"] optimizer steps, one line per step carrying the
    figures so far (a step killed by its timeout loses only what it had not finished), then the
    summary. With `budget_s`, no step starts that would likely end past it (the summary says so)."""
    import torch
    from moeforge.platform.plan.accounting import estimate
    from moeforge.platform.precision import warm_up_fp8_kernels
    from moeforge.platform.train.trainer import Trainer

    name = f"train_{precision}"
    s = TRAIN[size]
    with tempfile.TemporaryDirectory(prefix="moeforge-gpu-check-") as tmp:
        cfg = train_config(size, precision, device, os.path.join(tmp, "run"))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        built = time.perf_counter()
        engine = Trainer.single(cfg, log=lambda _line: None).engine
        build_s = time.perf_counter() - built
        run_device = engine.device
        shape = {
            "model": s["model"],
            "precision": precision,
            "seq_len": cfg.model.seq_len,
            "global_batch": cfg.data.global_batch,
            "microbatches": cfg.parallel.microbatches,
        }
        params = sum(p.numel() for p in engine.params)
        res.write(name, "built", device=str(run_device), params=params, build_s=round(build_s, 2), **shape)
        # As Trainer.train does before step 1: compile and tune the FP8 kernels (none for bf16).
        tokens = cfg.data.global_batch // cfg.parallel.microbatches * cfg.model.seq_len
        warmed = warm_up_fp8_kernels(engine.model, cfg.precision, tokens)
        res.write(name, "warm_up", backend=warmed.backend, launches=warmed.launches, shapes=len(warmed.shapes),
                  seconds=round(warmed.seconds, 2))  # fmt: skip
        tokens_per_step = cfg.data.global_batch * cfg.model.seq_len
        flops_per_token = estimate(cfg.model).run_flops_per_token
        peak = peak_tflops(run_device)
        times: list[float] = []
        losses: list[float] = []

        def figures() -> dict[str, Any]:
            """tokens/s and MFU over the steps after the warm-up ones, peak memory, the losses."""
            timed = times[s["timed_after"] :]
            rate = tokens_per_step * len(timed) / sum(timed) if timed else None
            out = {
                "tokens_per_s": rate,
                "mfu": rate * flops_per_token / (peak * 1e12) if rate and peak else None,
                "timed_steps": len(timed),
                "median_step_s": round(statistics.median(timed), 4) if timed else None,
                "peak_memory_gib": (
                    torch.cuda.max_memory_allocated(run_device) / 2**30 if run_device.type == "cuda" else None
                ),
            }
            if precision == "fp8":
                out.update(_fp8_over_bf16(res, shape, losses))
            return out

        stopped = None
        for i in range(cfg.run.steps):
            after_first = times[1:][-3:]  # the first step also autotunes and compiles: not a guide
            if budget_s is not None and (
                elapsed() > budget_s or (after_first and elapsed() + 1.2 * max(after_first) > budget_s)
            ):
                stopped = f"time budget of {budget_s:.0f} s"
                break
            sync(run_device)
            start = time.perf_counter()
            metrics = engine.train_step()
            sync(run_device)
            times.append(time.perf_counter() - start)
            losses.append(metrics.loss)
            res.write(
                name,
                "step",
                iteration=i + 1,
                loss=finite_or_none(metrics.loss),
                lm_loss=finite_or_none(metrics.lm_loss),
                mtp_loss=finite_or_none(metrics.mtp_loss),
                grad_norm=finite_or_none(metrics.grad_norm),
                step_s=round(times[-1], 4),
                skipped=metrics.skipped,
                **figures(),
            )
        finite = bool(losses) and all(math.isfinite(x) for x in losses)
        summary: dict[str, Any] = {
            **shape,
            "device": str(run_device),
            "gpu": torch.cuda.get_device_name(run_device) if run_device.type == "cuda" else None,
            "params": params,
            "steps_done": len(times),
            "steps_asked": cfg.run.steps,
            "stopped_early": stopped,
            "tokens_per_step": tokens_per_step,
            "build_s": round(build_s, 2),
            "first_step_s": round(times[0], 3) if times else None,
            "flops_per_token": flops_per_token,
            "peak_tflops": peak,
            "peak_basis": PEAK_BASIS,
            **figures(),
            "first_loss": finite_or_none(losses[0]) if losses else None,
            "final_loss": finite_or_none(losses[-1]) if losses else None,
            "passed": finite and len(times) == cfg.run.steps,
        }
        res.write(name, "summary", **summary)
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return summary["passed"]


def _fp8_over_bf16(res: Results, shape: dict, losses: list[float]) -> dict:
    """fp8's loss over bf16's at the last step both runs completed (the last train_bf16 run in the
    file, of the same shape), and the same ratio of their means over the 5 steps up to it."""
    lines = res.read()
    built = [
        i for i, line in enumerate(lines) if line.get("step") == "train_bf16" and line.get("what") == "built"
    ]
    if not built:
        return {"fp8_over_bf16": None, "fp8_over_bf16_note": "no train_bf16 run in this file"}
    first = built[-1]
    if any(lines[first].get(k) != shape.get(k) for k in ("model", "seq_len", "global_batch", "microbatches")):
        return {"fp8_over_bf16": None, "fp8_over_bf16_note": "the train_bf16 run has another shape"}
    bf16 = [
        line["loss"]
        for line in lines[first:]
        if line.get("step") == "train_bf16" and line.get("what") == "step"
    ]
    common = min(len(bf16), len(losses))
    if not common or any(x is None for x in bf16[:common]):
        return {"fp8_over_bf16": None, "fp8_over_bf16_note": "no common finite step"}
    window = slice(max(0, common - 5), common)
    return {
        "fp8_over_bf16": finite_or_none(losses[common - 1] / bf16[common - 1]),
        "fp8_over_bf16_last5": finite_or_none(
            statistics.fmean(losses[window]) / statistics.fmean(bf16[window])
        ),
        "fp8_over_bf16_at_step": common,
    }
