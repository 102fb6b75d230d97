"""Shared helpers of the pipeline tests: tiny configs, the single-process reference, and the one
comparison every pipeline-vs-reference case goes through (`assert_matches_reference`)."""

from __future__ import annotations

import copy
import importlib.resources
import json
import math
import os
from dataclasses import dataclass

import torch
import yaml
from moeforge.platform.checkpoint.reshard import read_model_state
from moeforge.platform.checkpoint.store import list_checkpoints
from moeforge.platform.config import TrainConfig
from moeforge.platform.data.microbatches import default_batch_source
from moeforge.platform.outputs.grad_dump import GRAD_DUMP_ENV, load_grads
from moeforge.platform.train.single import SingleProcessEngine
from moeforge.platform.train.trainer import Trainer

# Tolerances of the comparison (relative, every step). Measured on the cases of the executor, Ray and
# integration tests: losses <= 1.1e-8, grad norms <= 9.4e-8 (DeepSpeed and PlainStep add the squares
# of partitions and stages in other orders than the reference), parameters <= 6.1e-7. 1e-4 on the
# norm is far above that noise and far below any scale error a factor in the step could make.
# Step-1 gradients, per tensor (max |g - ref| / max |ref|): GRAD_RTOL, see `Tolerances`.
LOSS_RTOL, GRAD_NORM_RTOL, PARAM_RTOL = 1e-5, 1e-4, 1e-5
GRAD_RTOL = 1e-5

# MOEFORGE_DUMP_GRADS for every compared run: each writes its step-1 gradients into run.dir/grads
GRADS = "grads"


def tiny_model(**changes) -> dict:
    values = yaml.safe_load(
        importlib.resources.files("moeforge.conf").joinpath("model/tiny.yaml").read_text()
    )
    values.pop("arch", None)
    values.update({"seq_len": 32, **changes})
    return values


def pipeline_config(
    run_dir,
    schedule: str,
    pp: int,
    dp: int,
    microbatches: int,
    zero_stage: int,
    resources: dict | None = None,
    debug: dict | None = None,
    **parallel,
) -> dict:
    """A raw (Hydra-like) config of the tiny model on synthetic data, 2 steps.

    Adam divides each gradient entry by its own running RMS (+ eps), so an entry whose gradient is a
    near-cancelling sum turns an ulp of summation-order noise (a pipeline adds micro-batch and stage
    contributions in another order than one process does) into a visible fraction of an lr-sized
    step. A small lr (1e-4) and eps=1e-6 (instead of 1e-8) keep that conditioning noise far below the
    1e-5 tolerance (measured: ~2e-7 vs ~1e-5 with eps=1e-8 on DualPipe pp=4) while every weight
    still moves by ~lr per step, so a wrong gradient would still show. `resources` and `debug`:
    those sections' values (e.g. worker_resources, fault_injection)."""
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
        "resources": dict(resources or {}),
        "debug": dict(debug or {}),
        "data": {"global_batch": 8},
        "optim": {"lr": 1e-4, "min_lr": 0.0, "eps": 1e-6, "warmup_steps": 1},
        "tracking": {"log_timeline": True},
        # the last step only: its checkpoint holds the run's final parameters (`final_params`)
        "checkpoint": {"every": 1000, "keep": 1},
    }


@dataclass
class RunRecord:
    """What a comparison needs from one run: per step, the loss and the global gradient norm before
    clipping, as the run recorded them in run.dir/metrics.jsonl (StepMetrics, written alike by the
    reference loop and the pipeline's rank 0), the final parameters by full-model name, and each
    parameter's step-1 gradient as the optimizer received it (run.dir/grads, written under
    MOEFORGE_DUMP_GRADS: platform/outputs/grad_dump.py; None when the run wrote none)."""

    losses: list[float]
    grad_norms: list[float]
    params: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor] | None = None


def dump_grads(monkeypatch) -> None:
    """Make the runs this test starts (gloo processes, Ray workers, the reference loop) write their
    step-1 gradients into their run.dir/grads, where `run_record` reads them."""
    monkeypatch.setenv(GRAD_DUMP_ENV, GRADS)


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_record(run_dir, params: dict[str, torch.Tensor]) -> RunRecord:
    """The RunRecord of the run in `run_dir`; every step must be there, each with a finite grad_norm."""
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, len(records) + 1)), f"{run_dir}: steps missing"
    for r in records:
        assert "grad_norm" in r, f"{run_dir}: step {r['step']} recorded no grad_norm"
        assert math.isfinite(r["grad_norm"]), f"{run_dir}: step {r['step']} grad_norm is {r['grad_norm']}"
    grads_dir = os.path.join(run_dir, GRADS)
    grads = load_grads(grads_dir) if os.path.isdir(grads_dir) else None
    return RunRecord([r["loss"] for r in records], [r["grad_norm"] for r in records], params, grads)


def final_params(run_dir) -> dict[str, torch.Tensor]:
    """The whole model's parameters and buffers by full-model name, from the run's newest checkpoint
    (every rank's shard of it, whatever the layout)."""
    found = list_checkpoints(str(run_dir))
    assert found, f"{run_dir}: no checkpoint to read the final parameters from"
    tensors, _ = read_model_state(found[-1][1])
    return tensors


def pipeline_record(run_dir) -> RunRecord:
    """A pipeline run's record: rank 0's metrics.jsonl and the parameters of its newest checkpoint."""
    return run_record(run_dir, final_params(run_dir))


def reference_run(raw: dict, run_dir, engine_cls: type[SingleProcessEngine] = SingleProcessEngine) -> RunRecord:
    """The single-process reference loop on the same data and global batch, with M * dp micro-batches
    (the same micro-batch rows the pipeline's dp replicas see). `engine_cls` lets a test inject an
    error into the one-process step (a subclass)."""
    ref_raw = copy.deepcopy(raw)
    par = raw["parallel"]
    ref_raw["parallel"] = {"schedule": "single", "microbatches": par["microbatches"] * par.get("dp", 1)}
    ref_raw["run"]["dir"] = str(run_dir)
    # One intra-op thread, like each pipeline worker (cpus_per_worker=1): matmul reductions then add
    # in the same order, and the comparison sees only the pipeline's own reordering.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dumping = os.environ.get(GRAD_DUMP_ENV)
    os.environ[GRAD_DUMP_ENV] = GRADS  # the reference always records its step-1 gradients
    try:
        cfg = TrainConfig.from_dict(ref_raw)
        engine = engine_cls(cfg, default_batch_source(cfg), log=lambda _line: None)
        Trainer(cfg, engine, log=lambda _line: None).train()
    finally:
        torch.set_num_threads(threads)
        if dumping is None:
            os.environ.pop(GRAD_DUMP_ENV)
        else:
            os.environ[GRAD_DUMP_ENV] = dumping
    return run_record(run_dir, {k: v.detach().clone() for k, v in engine.model.state_dict().items()})


def relative_difference(value: torch.Tensor, ref: torch.Tensor) -> float:
    """max|value - ref| / max|ref| (NaN compares as infinitely far)."""
    d = float((value - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    return d if math.isfinite(d) else math.inf


def max_relative_difference(
    params: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], what: str = "parameter"
) -> tuple[float, str]:
    """max over tensors of max|p - ref| / max|ref|; every reference tensor must be present."""
    worst, name = 0.0, ""
    for key, ref in reference.items():
        assert key in params, f"the run recorded no {what} {key}"
        diff = relative_difference(params[key], ref)
        if diff > worst or not name:
            worst, name = diff, key
    return worst, name


def relative_differences(values: list[float], reference: list[float]) -> list[float]:
    """Per step |a - b| / |b| (NaN compares as infinitely far)."""
    assert len(values) == len(reference), f"{len(values)} steps vs the reference's {len(reference)}"
    out = []
    for a, b in zip(values, reference):
        d = abs(a - b) / max(abs(b), 1e-30)
        out.append(d if math.isfinite(d) else math.inf)
    return out


def assert_losses_match(losses: list[float], ref_losses: list[float], rtol: float = LOSS_RTOL) -> None:
    for step, d in enumerate(relative_differences(losses, ref_losses), start=1):
        assert d <= rtol, f"step {step}: loss {losses[step - 1]} vs reference {ref_losses[step - 1]}"


def assert_grad_norms_match(norms: list[float], ref_norms: list[float], rtol: float = GRAD_NORM_RTOL) -> None:
    for step, d in enumerate(relative_differences(norms, ref_norms), start=1):
        assert d <= rtol, (
            f"step {step}: grad_norm {norms[step - 1]} vs reference {ref_norms[step - 1]} "
            f"(relative difference {d:.2e} > {rtol:.0e})"
        )


@dataclass(frozen=True)
class Tolerances:
    """Relative bounds of one comparison: per-step losses and pre-clip gradient norms, each step-1
    gradient tensor (max |g - ref| / max |ref|), each final parameter tensor. The defaults hold
    every fp32 case (measured: see the constants above); lower-precision cases measure their own."""

    loss: float = LOSS_RTOL
    grad_norm: float = GRAD_NORM_RTOL
    grad: float = GRAD_RTOL
    param: float = PARAM_RTOL


@dataclass
class Comparison:
    """The measured differences of one comparison (relative; per step for losses and grad norms;
    the worst step-1 gradient and final parameter tensors, by name)."""

    loss: list[float]
    grad_norm: list[float]
    param: float
    param_name: str
    grad: float | None = None  # None: the run recorded no step-1 gradients
    grad_name: str = ""

    def format(self) -> str:
        grads = "not recorded" if self.grad is None else f"{self.grad:.1e} ({self.grad_name})"
        return (
            f"loss per step {', '.join(f'{d:.1e}' for d in self.loss)} | grad_norm per step "
            + ", ".join(f"{d:.1e}" for d in self.grad_norm)
            + f" | step-1 grads {grads} | params {self.param:.1e} ({self.param_name})"
        )


def assert_grads_match(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rtol: float = GRAD_RTOL) -> None:
    """Every parameter's step-1 gradient, by name: the same tensors, each within `rtol`."""
    assert sorted(grads) == sorted(ref), (
        f"step-1 gradients of other tensors: {sorted(set(grads) ^ set(ref))[:6]} in one run only"
    )
    for name, value in ref.items():
        d = relative_difference(grads[name], value)
        assert d <= rtol, f"step-1 gradient of {name} differs by {d:.2e} (relative) > {rtol:.0e}"


def assert_matches_reference(
    run: RunRecord, ref: RunRecord, label: str = "", tol: Tolerances = Tolerances()
) -> Comparison:
    """THE pipeline-vs-reference comparison (every case calls it): per-step losses, per-step
    pre-clip gradient norms, every parameter's step-1 gradient by name, and final parameters all
    match, in that order.

    The gradient norm is what catches a uniform gradient-scale error (a wrong 1/M, 1/dp or
    DualPipe-pair factor): AdamW divides the scale out of every update and clipping caps the
    norm, so losses stay equal and parameters move by the same ~lr either way. A scale error on
    one small tensor (a router gate, a norm weight) moves the norm by less than its tolerance too:
    only that tensor's gradient shows it (tests/test_pipeline_executor.py shows both). Both runs
    must have recorded them: the reference always does, a pipeline run under `dump_grads`."""
    comparison = Comparison(
        relative_differences(run.losses, ref.losses),
        relative_differences(run.grad_norms, ref.grad_norms),
        *max_relative_difference(run.params, ref.params),
    )
    assert ref.grads is not None, "the reference run recorded no step-1 gradients (use reference_run)"
    assert run.grads is not None, (
        f"{label}: the run recorded no step-1 gradients (call pipeline_cases.dump_grads before it runs)"
    )
    comparison.grad, comparison.grad_name = max_relative_difference(run.grads, ref.grads, "gradient of")
    print(f"{label} vs reference: {comparison.format()}")  # the measured figures, for `pytest -s`
    assert_losses_match(run.losses, ref.losses, tol.loss)
    assert_grad_norms_match(run.grad_norms, ref.grad_norms, tol.grad_norm)
    assert_grads_match(run.grads, ref.grads, tol.grad)
    assert comparison.param <= tol.param, (
        f"{comparison.param_name}: parameters differ by {comparison.param:.2e} (relative) > {tol.param:.0e}"
    )
    return comparison


COMPUTE_KINDS = ("F", "B", "W", "BW", "FB")


def assert_timeline_runs_schedule(run_dir, schedule: str, pp: int, dp: int, microbatches: int) -> None:
    """The measured timeline of the last step (timeline.json, every world rank) against the
    simulator and the step's metrics:

    - every rank ran exactly the compute actions the simulator runs for its pipeline rank, in the
      same order (the same action lists feed both: what is simulated is what runs);
    - the recorded bubble_fraction is 1 - mean busy / longest span recomputed from those events, and
      each rank's exposed communication is the sum of its WAIT events, both up to float64 rounding
      (`float_slack`): a rank's span ends with its last record of any kind, the reaped SENDs
      included, and the timeline holds every record the step's figures were made from.
    (Real compute on shared cores has no fixed costs, so the measured bubble itself is not held
    against the simulator's; tests/test_pipeline_bench.py checks the order of what ran instead.)"""
    from moeforge.platform.schedules import Costs, build_schedule, simulate

    def float_slack(terms: int) -> float:
        """The relative error float64 leaves in a figure recomputed from `terms` trace events: the
        trace holds each record as ts = start * 1e6 and dur = (end - start) * 1e6, exact doubles
        (not rounded to whole microseconds), so reading them back as seconds rounds a few times
        per event (subtraction, scaling there and back, one addition): at most 4 ulps each, plus
        the final division and mean."""
        return 4 * (terms + 8) * 2.0**-52

    with open(os.path.join(run_dir, "timeline.json")) as f:
        trace = json.load(f)["traceEvents"]
    events = [e for e in trace if e.get("ph") == "X"]
    sim = simulate(build_schedule(schedule, pp, microbatches), Costs())
    expected = {r: [rec.label for rec in sim.records() if rec.rank == r] for r in range(pp)}
    busy, end, waits, wait_counts = [], [], [], []
    for rank in range(pp * dp):
        mine = sorted((e for e in events if e["tid"] == rank), key=lambda e: e["ts"])
        compute = [e for e in mine if e["cat"] in COMPUTE_KINDS]
        assert [e["name"] for e in compute] == expected[rank % pp], f"rank {rank} ran another action list"
        busy.append(sum(e["dur"] for e in compute) / 1e6)
        end.append(max(e["ts"] + e["dur"] for e in mine) / 1e6)
        rank_waits = [e["dur"] for e in mine if e["cat"] == "WAIT"]
        waits.append(sum(rank_waits) / 1e6)
        wait_counts.append(len(rank_waits))
    last = read_metrics(run_dir)[-1]
    bubble = 1.0 - sum(busy) / len(busy) / max(end)
    slack = float_slack(sum(len(expected[r % pp]) for r in range(pp * dp)))
    assert abs(last["bubble_fraction"] - bubble) <= slack, (last["bubble_fraction"], bubble, slack)
    for rank, (recorded, summed) in enumerate(zip(last["exposed_comm_s_per_rank"], waits)):
        assert abs(recorded - summed) <= float_slack(wait_counts[rank]) * summed, (
            f"rank {rank}: exposed comm {recorded} s vs WAIT events {summed} s"
        )
