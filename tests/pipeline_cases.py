"""Shared helpers of the pipeline tests: tiny configs and the single-process reference to compare with."""

from __future__ import annotations

import copy
import importlib.resources

import torch
import yaml
from moeforge.platform.config import TrainConfig
from moeforge.platform.reference.loop import ReferenceTrainer


def tiny_model(**changes) -> dict:
    values = yaml.safe_load(
        importlib.resources.files("moeforge.conf").joinpath("model/tiny.yaml").read_text()
    )
    values.pop("arch", None)
    values.update({"seq_len": 32, **changes})
    return values


def pipeline_config(
    run_dir, schedule: str, pp: int, dp: int, microbatches: int, zero_stage: int, **parallel
) -> dict:
    """A raw (Hydra-like) config of the tiny model on synthetic data, 2 steps.

    Adam divides each gradient entry by its own running RMS (+ eps), so an entry whose gradient is a
    near-cancelling sum turns an ulp of summation-order noise (a pipeline adds micro-batch and stage
    contributions in another order than one process does) into a visible fraction of an lr-sized
    step. A small lr (1e-4) and eps=1e-6 (instead of 1e-8) keep that conditioning noise far below the
    1e-5 tolerance (measured: ~2e-7 vs ~1e-5 with eps=1e-8 on DualPipe pp=4) while every weight
    still moves by ~lr per step, so a wrong gradient would still show."""
    return {
        "model": tiny_model(),
        "run": {"dir": str(run_dir), "steps": 2, "log_every": 1, "eval_every": 0},
        "parallel": {
            "schedule": schedule,
            "pp": pp,
            "dp": dp,
            "microbatches": microbatches,
            "zero_stage": zero_stage,
            **parallel,
        },
        "data": {"global_batch": 8},
        "optim": {"lr": 1e-4, "min_lr": 0.0, "eps": 1e-6, "warmup_steps": 1},
        "tracking": {"log_timeline": True},
    }


def reference_run(raw: dict, run_dir) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The single-process reference loop on the same data and global batch, with M * dp micro-batches
    (the same micro-batch rows the pipeline's dp replicas see)."""
    ref_raw = copy.deepcopy(raw)
    par = raw["parallel"]
    ref_raw["parallel"] = {"schedule": "single", "microbatches": par["microbatches"] * par["dp"]}
    ref_raw["run"]["dir"] = str(run_dir)
    # One intra-op thread, like each pipeline worker (cpus_per_worker=1): matmul reductions then add
    # in the same order, and the comparison sees only the pipeline's own reordering.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = ReferenceTrainer(TrainConfig.from_dict(ref_raw), log=lambda _line: None)
        summary = trainer.train()
    finally:
        torch.set_num_threads(threads)
    return summary.losses, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def max_relative_difference(
    params: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
) -> tuple[float, str]:
    """max over tensors of max|p - ref| / max|ref|; every reference tensor must be present."""
    worst, name = 0.0, ""
    for key, ref in reference.items():
        assert key in params, f"pipeline run did not save {key}"
        diff = float((params[key] - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        if diff > worst:
            worst, name = diff, key
    return worst, name


def assert_losses_match(losses: list[float], ref_losses: list[float], rtol: float = 1e-5) -> None:
    assert len(losses) == len(ref_losses)
    for step, (a, b) in enumerate(zip(losses, ref_losses)):
        assert abs(a - b) <= rtol * abs(b), f"step {step}: pipeline loss {a} vs reference {b}"
