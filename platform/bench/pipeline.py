"""moeforge-bench pipeline: the executor measured against the schedule simulator, and real tiny runs.

Synthetic part: for each schedule and pp, the real executor runs its action lists on pp spawned
processes joined by gloo, every F / B / W sleeping a configured time instead of computing (and
passing a small tensor along, so the point-to-point traffic is real). The measured step time sits
next to the simulator's makespan for the same lists and costs (goal: measured <= 1.10 x simulated,
and the same ranking of schedules). An overlapped F&B costs f + b here (one CPU thread computes
the two halves back to back), and the simulator is given the same. Each row also lists, per rank,
the compute actions, sends and receives its last measured step ran (`ran`, `sent`, `received`).

Real part: the tiny model trained for a few steps by the pipeline runtime (spawned gloo processes,
no Ray start-up in the timing) next to the single-process reference loop, tokens/s of the steady
steps (the first step, with its warm-up, is left out).

Writes a JSON report and returns a table.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import statistics
import tempfile
from dataclasses import dataclass, field
from typing import Any

from moeforge.platform.bench.report import write_report
from moeforge.platform.config.builder import build, require
from moeforge.platform.config.presets import preset_values


@dataclass
class PipelineBenchConfig:
    schedules: list[str] = field(default_factory=lambda: ["1f1b", "zb1p", "dualpipe", "dualpipev"])
    pps: list[int] = field(default_factory=lambda: [4, 8])
    microbatches_per_rank: int = 4  # micro-batches = this * pp (DualPipe needs an even count >= 2 pp)
    f_ms: float = 20.0  # forward of one chunk
    b_ms: float = 40.0  # full backward (input + weight gradient)
    w_ms: float = 20.0  # the weight-gradient part of b_ms
    act_numel: int = 4096  # floats per transfer
    steps: int = 3  # measured steps per case (the first is left out when there are more)
    real: list[list[Any]] = field(default_factory=lambda: [["dualpipe", 2], ["dualpipe", 4]])
    real_model: str = "tiny"
    real_microbatches: int = 8
    real_global_batch: int = 16
    real_steps: int = 3
    timeout_s: float = 120.0
    output: str = "runs/bench/pipeline.json"

    def __post_init__(self) -> None:
        from moeforge.platform.schedules import GENERATORS

        for name in self.schedules:
            require(
                name in GENERATORS, "schedules", f"unknown schedule {name!r} (known: {sorted(GENERATORS)})"
            )
        require(
            all(isinstance(p, int) and p >= 2 for p in self.pps), "pps", f"need integers >= 2, got {self.pps}"
        )
        require(self.microbatches_per_rank >= 1, "microbatches_per_rank", "must be >= 1")
        require(self.f_ms > 0 and self.b_ms > 0, "f_ms", "costs must be positive")
        require(0 <= self.w_ms <= self.b_ms, "w_ms", f"must lie in [0, b_ms={self.b_ms}]")
        require(self.act_numel >= 1, "act_numel", "must be >= 1")
        require(self.steps >= 1, "steps", "must be >= 1")
        require(self.real_steps >= 2, "real_steps", "must be >= 2 (the first step is warm-up)")
        for item in self.real:
            require(
                len(item) == 2 and item[0] in GENERATORS and int(item[1]) >= 2,
                "real",
                f"entries are [schedule, pp], got {item}",
            )

    @classmethod
    def from_dict(cls, values: dict) -> PipelineBenchConfig:
        return build(cls, values, "bench_pipeline")


# ---- synthetic costs -----------------------------------------------------------------------------
def _synthetic_rank(
    rank: int, world_size: int, cases: list[tuple[str, int]], cfg: PipelineBenchConfig
) -> list:
    """Run every (schedule, M) case on this rank's executor; rank 0 returns the measured times."""
    import torch
    import torch.distributed as dist
    from moeforge.platform.engine.executor import COMPUTE_RECORD_KINDS, PipelineExecutor, SleepCompute
    from moeforge.platform.engine.p2p import P2P, open_links
    from moeforge.platform.engine.topology import Topology, create_links
    from moeforge.platform.schedules import build_schedule

    out = []
    act_shape = (cfg.act_numel,)
    p2p_links = Topology(world_size, 1).p2p_links()  # every layout links the same neighbours
    links = create_links(p2p_links, rank)
    for name, microbatches in cases:
        schedule = build_schedule(name, world_size, microbatches)
        scale = schedule.pp / schedule.num_stages / 1e3  # DualPipeV's chunks are half stages
        compute = SleepCompute(cfg.f_ms * scale, cfg.b_ms * scale, cfg.w_ms * scale, act_shape)
        p2p = P2P(rank, cfg.timeout_s, links, name=f"rank {rank}", timeline_rank=rank)
        open_links(p2p, p2p_links)
        executor = PipelineExecutor(
            schedule, rank, compute, p2p, world_rank_of=lambda q: q, act_shape=act_shape
        )
        steps = []
        for _ in range(cfg.steps):
            dist.barrier()
            trace = executor.run()
            stats = torch.tensor([trace.step_s, trace.busy_s, trace.exposed_comm_s], dtype=torch.float64)
            gathered = [torch.zeros_like(stats) for _ in range(world_size)]
            dist.all_gather(gathered, stats)
            table = torch.stack(gathered)  # [rank, (step, busy, exposed)]
            steps.append(
                {
                    "step_s": float(table[:, 0].max()),
                    "bubble": float(1 - table[:, 1].mean() / table[:, 0].max()),
                    "exposed_comm_s": float(table[:, 2].max()),
                }
            )
        # What the last step ran on each rank, in the order it started: compute actions, and the
        # transfers completed (the executor records a SEND or RECV once its transfer is done).
        kinds = {"ran": COMPUTE_RECORD_KINDS, "sent": {"SEND"}, "received": {"RECV"}}
        mine = {key: [r.label for r in trace.records if r.kind in kind] for key, kind in kinds.items()}
        everyone = [None] * world_size
        dist.all_gather_object(everyone, mine)
        per_rank = {key: [theirs[key] for theirs in everyone] for key in kinds}  # key -> [rank] -> labels
        out.append(
            {"schedule": name, "pp": world_size, "microbatches": microbatches, "steps": steps, **per_rank}
        )
    return out


def run_synthetic(cfg: PipelineBenchConfig) -> list[dict]:
    from moeforge.platform.launch.local_spawn import spawn_gloo
    from moeforge.platform.schedules import Costs, build_schedule, simulate

    costs = Costs(f=cfg.f_ms / 1e3, b=cfg.b_ms / 1e3, w=cfg.w_ms / 1e3, fb=(cfg.f_ms + cfg.b_ms) / 1e3)
    rows = []
    for pp in cfg.pps:
        cases = [(name, cfg.microbatches_per_rank * pp) for name in cfg.schedules]
        measured = spawn_gloo(_synthetic_rank, pp, (cases, cfg), timeout_s=cfg.timeout_s)[0]
        for case in measured:
            schedule = build_schedule(case["schedule"], pp, case["microbatches"])
            sim = simulate(schedule, costs.scaled(schedule.pp / schedule.num_stages))
            steady = case["steps"][1:] or case["steps"]
            step_s = statistics.median(s["step_s"] for s in steady)
            rows.append(
                {
                    "schedule": case["schedule"],
                    "pp": pp,
                    "microbatches": case["microbatches"],
                    "simulated_makespan_s": sim.makespan,
                    "simulated_bubble": sum(sim.idle) / (len(sim.idle) * sim.makespan),
                    "measured_step_s": step_s,
                    "measured_bubble": statistics.median(s["bubble"] for s in steady),
                    "exposed_comm_s": statistics.median(s["exposed_comm_s"] for s in steady),
                    "ratio": step_s / sim.makespan,
                    # per rank, the last measured step's compute actions, sends and receives
                    "ran": case["ran"],
                    "sent": case["sent"],
                    "received": case["received"],
                }
            )
    return rows


def rankings(rows: list[dict], tie_tolerance: float = 0.02) -> dict[str, dict]:
    """Per pp: schedules fastest first, simulated and measured; `same` is the strict comparison of
    the two orders; `consistent` only asks that every pair the simulator separates by more than
    `tie_tolerance` (relative) be measured in the same order (near-ties may swap)."""
    out = {}
    for pp in sorted({r["pp"] for r in rows}):
        mine = [r for r in rows if r["pp"] == pp]
        sim = [r["schedule"] for r in sorted(mine, key=lambda r: r["simulated_makespan_s"])]
        meas = [r["schedule"] for r in sorted(mine, key=lambda r: r["measured_step_s"])]
        consistent = all(
            a["measured_step_s"] < b["measured_step_s"]
            for a in mine
            for b in mine
            if a["simulated_makespan_s"] < b["simulated_makespan_s"] * (1 - tie_tolerance)
        )
        out[str(pp)] = {
            "simulated": sim,
            "measured": meas,
            "same": sim == meas,
            "consistent": consistent,
            "tie_tolerance": tie_tolerance,
        }
    return out


# ---- real tiny model -----------------------------------------------------------------------------
def _real_config(cfg: PipelineBenchConfig, run_dir: str, schedule: str, pp: int) -> dict:
    model = preset_values("model", cfg.real_model)
    return {
        "model": model,
        "run": {"dir": run_dir, "steps": cfg.real_steps, "log_every": cfg.real_steps, "eval_every": 0},
        "parallel": {"schedule": schedule, "pp": pp, "microbatches": cfg.real_microbatches, "zero_stage": 1},
        "data": {"global_batch": cfg.real_global_batch},
        "tracking": {"log_timeline": False},
    }


def _steady_tokens_per_s(run_dir: str) -> float:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    steady = records[1:] or records
    return statistics.median(r["tokens"] / r["step_time_s"] for r in steady)


def run_real(cfg: PipelineBenchConfig) -> list[dict]:
    import torch
    from moeforge.platform.config import TrainConfig
    from moeforge.platform.launch.local_spawn import spawn_gloo
    from moeforge.platform.train.pipeline import train_from_dict
    from moeforge.platform.train.trainer import Trainer

    rows = []
    with tempfile.TemporaryDirectory(prefix="moeforge-bench-") as tmp:
        single_raw = _real_config(cfg, os.path.join(tmp, "single"), "1f1b", 1)
        single_raw["parallel"] = {"schedule": "single", "microbatches": cfg.real_microbatches}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one core, like each pipeline worker
        try:
            Trainer.single(TrainConfig.from_dict(single_raw), log=lambda _line: None).train()
        finally:
            torch.set_num_threads(threads)
        single = _steady_tokens_per_s(single_raw["run"]["dir"])
        for schedule, pp in cfg.real:
            raw = _real_config(cfg, os.path.join(tmp, f"{schedule}_pp{pp}"), schedule, int(pp))
            summary = spawn_gloo(
                train_from_dict, int(pp), (copy.deepcopy(raw), True), timeout_s=cfg.timeout_s * 4
            )[0]
            tok_s = _steady_tokens_per_s(raw["run"]["dir"])
            rows.append(
                {
                    "schedule": schedule,
                    "pp": int(pp),
                    "tokens_per_s": tok_s,
                    "single_tokens_per_s": single,
                    "speedup": tok_s / single,
                    "bubble_fraction": summary["bubble_fraction"],
                    "exposed_comm_s": summary["exposed_comm_s"],
                    "final_loss": summary["final_loss"],
                }
            )
    return rows


# ---- job -----------------------------------------------------------------------------------------
def run_benchmark(cfg: PipelineBenchConfig) -> dict:
    synthetic = run_synthetic(cfg)
    return {
        "config": dataclasses.asdict(cfg),
        "cpu_count": os.cpu_count(),
        "synthetic": synthetic,
        "rankings": rankings(synthetic),
        "real": run_real(cfg) if cfg.real else [],
    }


def format_table(report: dict) -> str:
    lines = [
        "synthetic costs (each F/B/W sleeps): measured executor step vs simulated makespan",
        (
            f"{'schedule':<10} {'pp':>3} {'M':>4} {'simulated s':>12} {'measured s':>11} {'ratio':>6} "
            f"{'sim bubble':>10} {'meas bubble':>11} {'exposed ms':>10}"
        ),
    ]
    for r in report["synthetic"]:
        lines.append(
            f"{r['schedule']:<10} {r['pp']:>3} {r['microbatches']:>4} {r['simulated_makespan_s']:>12.3f} "
            f"{r['measured_step_s']:>11.3f} {r['ratio']:>6.2f} {r['simulated_bubble']:>10.1%} "
            f"{r['measured_bubble']:>11.1%} {r['exposed_comm_s'] * 1e3:>10.1f}"
        )
    for pp, rank in report["rankings"].items():
        verdict = "same" if rank["same"] else ("same up to near-ties" if rank["consistent"] else "DIFFERENT")
        lines.append(
            f"pp={pp} ranking: simulated {rank['simulated']} | measured {rank['measured']} ({verdict})"
        )
    if report["real"]:
        lines.append("real tiny model (steady steps) vs the single-process loop")
        lines.append(
            f"{'schedule':<10} {'pp':>3} {'tok/s':>9} {'single tok/s':>12} {'speedup':>8} {'bubble':>7}"
        )
        for r in report["real"]:
            lines.append(
                f"{r['schedule']:<10} {r['pp']:>3} {r['tokens_per_s']:>9.0f} {r['single_tokens_per_s']:>12.0f} "
                f"{r['speedup']:>8.2f} {r['bubble_fraction']:>7.1%}"
            )
    return "\n".join(lines)


def run_job(values: dict) -> str:
    """`moeforge-bench pipeline`: config dict -> run, write the JSON report, return the table."""
    cfg = PipelineBenchConfig.from_dict(values)
    report = run_benchmark(cfg)
    return write_report(cfg.output, report, format_table(report))
