"""moeforge-bench overlap: how much of the MoE all-to-all DualPipe's overlapped F&B pair hides.

Synthetic part. pp x ep spawned gloo processes (rank = pp_rank * ep + ep_rank; the ep ranks of a
stage form its EP group, the ranks with one ep_rank a pipeline). Every chunk's phases sleep their
configured compute time and its all-to-alls move a configured payload through gloo for real
(`overlap_phases.SleepPhaseCompute`). For each schedule and pp:

    moeforge, overlap off   the executor runs each F&B pair's programs one after the other
    moeforge, overlap on    ... interleaved phase by phase (chunk_program.interleave)
    torch ScheduleDualPipeV the same chunk costs as torch pipelining stages
                            (`overlap_torch.torch_dualpipev_steps`), in the same processes, right after
                            ours

Figures per case, from the executor's own timeline records (P2P times every all-to-all wait):
    a2a_ms            one all-to-all's time: the mean launch-to-arrival span in pairs with overlap
                      off, where every all-to-all is waited on right after its launch (the payload
                      is sized in the run so that this is close to the configured a2a_ms)
    waited a2a ms     the same span for the all-to-alls a pair did wait for (their wait ended on
                      arrival): longer than a2a_ms when concurrent transfers slow each other
    pair_exposed_ms   per F&B pair, the time blocked on all-to-alls inside the pair
    hidden_fraction   1 - pair_exposed / (all-to-alls per pair x a2a_ms)
    simulated_s       the schedule simulator's makespan, the pair's cost from the phase costs
                      (`platform.schedules.phase_costs.pair_costs`) with the measured a2a_ms
    ratio_vs_torch    moeforge's step time / torch ScheduleDualPipeV's at the same pp

Real part: the tiny model with ep=2 x pp=2 (x dp=2, which EP divides) trained for a few steps in one
autograd graph per chunk, as phase programs run sequentially, and overlapped: tokens/s of the
steady steps and the time blocked on all-to-alls. On two CPU cores the four processes share two
cores, so the real part shows what the programs cost, not what a GPU gains.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field

from moeforge.platform.bench.report import write_report
from moeforge.platform.config.builder import build, require
from moeforge.platform.config.parallel import OVERLAP_ORDERS


@dataclass
class OverlapBenchConfig:
    schedules: list[str] = field(default_factory=lambda: ["dualpipe", "dualpipev"])
    pps: list[int] = field(default_factory=lambda: [2, 4])
    ep: int = 2
    microbatches_per_rank: int = 4  # micro-batches = this * pp (both DualPipes need >= 2 pp)
    layers_per_stage: int = 2  # MoE layers per pipeline stage: a DualPipe chunk, two DualPipeV chunks
    attn_ms: float = 8.0  # forward attention (+ router) phase
    experts_ms: float = 8.0  # forward experts phase
    tail_ms: float = 2.0  # the chunk's last phase (residual, head)
    backward_factor: float = 2.0  # each backward phase takes this times its forward phase ...
    w_fraction: float = 0.5  # ... of which this share is the deferrable weight gradient
    # Target time of one all-to-all: the payload is sized in the run itself (a probe, then two
    # corrections from a sequential schedule step), so that comm ~ compute holds on any machine.
    a2a_ms: float = 8.0
    act_numel: int = 16384  # float32 values per activation crossing stages
    steps: int = 3  # measured steps per case (the first is left out when there are more)
    orders: list[str] = field(default_factory=lambda: list(OVERLAP_ORDERS))  # parallel.overlap_order values
    torch_peer: bool = True
    real: bool = True
    real_model: str = "tiny"
    real_microbatches: int = 4
    real_global_batch: int = 16
    real_steps: int = 6
    timelines: bool = True  # rank 0's last step of each case as a PNG beside the report
    timeout_s: float = 180.0
    output: str = "runs/bench/overlap.json"

    def __post_init__(self) -> None:
        for name in self.schedules:
            require(name in ("dualpipe", "dualpipev"), "schedules", f"overlap needs F&B pairs: {name!r}")
        require(
            all(isinstance(p, int) and p >= 2 for p in self.pps), "pps", f"need integers >= 2, got {self.pps}"
        )
        require(self.ep >= 2, "ep", "needs >= 2 ranks to exchange anything")
        require(self.microbatches_per_rank >= 2, "microbatches_per_rank", "must be >= 2 (M >= 2 pp)")
        require(
            self.layers_per_stage >= 2 and self.layers_per_stage % 2 == 0,
            "layers_per_stage",
            f"must be even and >= 2 (DualPipeV halves a stage), got {self.layers_per_stage}",
        )
        for name in ("attn_ms", "experts_ms", "tail_ms"):
            require(getattr(self, name) >= 0, name, "must be >= 0")
        require(self.backward_factor > 0, "backward_factor", "must be > 0")
        require(0 <= self.w_fraction < 1, "w_fraction", "must lie in [0, 1)")
        require(self.a2a_ms > 0, "a2a_ms", "must be > 0")
        require(self.act_numel >= 1, "act_numel", "must be >= 1")
        require(self.steps >= 1, "steps", "must be >= 1")
        for order in self.orders:
            require(
                order in OVERLAP_ORDERS, "orders", f"unknown overlap order {order!r} (known: {OVERLAP_ORDERS})"
            )
        require(self.real_steps >= 2, "real_steps", "must be >= 2 (the first step is warm-up)")

    @classmethod
    def from_dict(cls, values: dict) -> OverlapBenchConfig:
        return build(cls, values, "bench_overlap")

    def shape(self, chunks_per_stage: int = 1, a2a_numel: int = 1):
        """The phases of one chunk: a whole stage (DualPipe), or half of one (DualPipeV, torch's)."""
        from moeforge.platform.bench.overlap_phases import PhaseShape

        return PhaseShape(
            layers=self.layers_per_stage // chunks_per_stage,
            attn_s=self.attn_ms / 1e3,
            experts_s=self.experts_ms / 1e3,
            tail_s=self.tail_ms / 1e3,
            backward_factor=self.backward_factor,
            w_fraction=self.w_fraction,
            a2a_numel=a2a_numel,
        )


# ---- synthetic: one rank -------------------------------------------------------------------------
def _p2p_links(pp: int, ep: int) -> list[tuple[int, int]]:
    """Directed (sender, receiver) pairs of pipeline neighbours, rank = pp_rank * ep + ep_rank."""
    links = []
    for e in range(ep):
        for r in range(pp - 1):
            a, b = r * ep + e, (r + 1) * ep + e
            links += [(a, b), (b, a)]
    return links


def _groups(rank: int, pp: int, ep: int):
    """(pp_rank, ep_rank, this rank's pipeline group, its EP group, its links); every rank creates
    every group in the same order, as torch.distributed requires."""
    import torch.distributed as dist
    from moeforge.platform.engine.topology import create_links

    pp_rank, ep_rank = divmod(rank, ep)
    pipelines = [dist.new_group([q * ep + e for q in range(pp)]) for e in range(ep)]
    ep_groups = [dist.new_group([r * ep + e for e in range(ep)]) for r in range(pp)]
    links = create_links(_p2p_links(pp, ep), rank)
    return pp_rank, ep_rank, pipelines[ep_rank], ep_groups[pp_rank], links


def _sized_payload(cfg: OverlapBenchConfig, ep_group, ep: int) -> int:
    """float32 values per all-to-all that take about cfg.a2a_ms here: a probe of 1 Mi values per
    rank, every EP group at once, the slowest rank's median of 5, scaled linearly."""
    import torch
    import torch.distributed as dist

    probe = 1 << 20
    x, out = torch.zeros(probe), torch.empty(probe)
    dist.all_to_all_single(out, x, group=ep_group)  # warm-up: connections, buffers
    times = []
    for _ in range(5):
        dist.barrier()
        start = time.perf_counter()
        dist.all_to_all_single(out, x, group=ep_group)
        times.append(time.perf_counter() - start)
    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # one size on every rank
    return max(ep, int(probe * cfg.a2a_ms / 1e3 / float(slowest)))


def _pair_figures(records) -> dict:
    """This rank's all-to-all figures of one step from its timeline records."""
    pairs = [r for r in records if r.kind == "FB"]
    spans = [r for r in records if r.kind == "A2A"]
    waits = [r for r in records if r.kind == "A2A_WAIT"]

    def inside(rec, pair) -> bool:
        return pair.start <= rec.start < pair.end

    in_pairs = [s for s in spans for p in pairs if inside(s, p)]
    # a wait that blocked ended when its transfer arrived: there the span is the transfer's own time
    blocked_ends = {(w.label.removeprefix("wait "), w.end) for w in waits}
    blocked = [s for s in in_pairs if (s.label, s.end) in blocked_ends]
    return {
        "pair_blocked_a2a": len(blocked),
        "pair_blocked_span_s": sum(s.end - s.start for s in blocked),
        "pairs": len(pairs),
        "pair_a2a": len(in_pairs),
        "pair_a2a_span_s": sum(s.end - s.start for s in in_pairs),
        "pair_exposed_s": sum(w.end - w.start for w in waits for p in pairs if inside(w, p)),
        "a2a": len(spans),
        "a2a_span_s": sum(s.end - s.start for s in spans),
        "a2a_exposed_s": sum(w.end - w.start for w in waits),
    }


def _synthetic_rank(rank: int, world_size: int, cfg: OverlapBenchConfig, pp: int) -> dict:
    import torch
    import torch.distributed as dist
    from moeforge.platform.bench.overlap_phases import SleepPhaseCompute
    from moeforge.platform.bench.overlap_torch import torch_dualpipev_steps
    from moeforge.platform.engine.executor import PipelineExecutor
    from moeforge.platform.engine.p2p import P2P, open_links
    from moeforge.platform.schedules import build_schedule

    ep, microbatches = cfg.ep, cfg.microbatches_per_rank * pp
    pp_rank, ep_rank, pp_group, ep_group, links = _groups(rank, pp, ep)
    act_shape = (1, cfg.act_numel)

    def run_case(name: str, order: str | None, a2a_numel: int, steps: int) -> tuple[list[dict], object]:
        schedule = build_schedule(name, pp, microbatches)
        shape = cfg.shape(schedule.num_stages // pp, a2a_numel)
        p2p = P2P(rank, cfg.timeout_s, links, name=f"rank {rank}", timeline_rank=rank)
        open_links(p2p, _p2p_links(pp, ep))
        compute = SleepPhaseCompute(shape, ep_group, ep, act_shape, tracker=p2p, order=order or OVERLAP_ORDERS[0])
        executor = PipelineExecutor(
            schedule,
            pp_rank,
            compute,
            p2p,
            world_rank_of=lambda q: q * ep + ep_rank,
            act_shape=act_shape,
            overlap=order is not None,
        )
        out = []
        for _ in range(steps):
            dist.barrier()
            trace = executor.run()
            step = torch.tensor([trace.step_s], dtype=torch.float64)
            dist.all_reduce(step, op=dist.ReduceOp.MAX)
            out.append({"step_s": float(step[0]), **_pair_figures(trace.records)})
        return out, trace

    # Size the payload so that one all-to-all takes cfg.a2a_ms inside a running schedule (where the
    # EP groups contend for the cores as they will in the cases): a probe, then two corrections from
    # the sequential pairs of the first schedule.
    a2a_numel = _sized_payload(cfg, ep_group, ep)
    for _ in range(2):
        steps, _trace = run_case(cfg.schedules[0], None, a2a_numel, 2)
        spans = torch.tensor([steps[-1]["pair_a2a_span_s"], steps[-1]["pair_a2a"]], dtype=torch.float64)
        dist.all_reduce(spans)
        a2a_numel = max(ep, int(a2a_numel * cfg.a2a_ms / 1e3 / float(spans[0] / spans[1])))
    out: dict = {"moeforge": [], "torch": None, "a2a_numel": a2a_numel}
    for name in cfg.schedules:
        for order in [None, *cfg.orders]:  # None: overlap off
            steps, trace = run_case(name, order, a2a_numel, cfg.steps)
            if cfg.timelines:  # the last step's records, for the timeline figure
                steps[-1]["records"] = [dataclasses.astuple(r) for r in trace.records]
            out["moeforge"].append({"schedule": name, "order": order, "steps": steps})
    if cfg.torch_peer:
        out["torch"] = torch_dualpipev_steps(
            pp_rank, pp, pp_group, ep_group, ep, cfg.shape(2, a2a_numel), microbatches, act_shape, cfg.steps
        )
    return out


# ---- synthetic: the cases --------------------------------------------------------------------------
def _steady(steps: list) -> list:
    return steps[1:] or steps


def _case_row(name: str, pp: int, order: str | None, per_rank: list[dict], a2a_s: float, cfg) -> dict:
    from moeforge.platform.schedules import build_schedule, simulate
    from moeforge.platform.schedules.phase_costs import overlapped_pair, pair_costs

    schedule = build_schedule(name, pp, cfg.microbatches_per_rank * pp)
    shape = cfg.shape(schedule.num_stages // pp)
    steady = [_steady(r["steps"]) for r in per_rank]  # [rank][step]
    step_s = statistics.median(s["step_s"] for s in steady[0])  # the max over ranks, alike on all
    keys = ("pairs", "pair_a2a", "pair_exposed_s", "pair_blocked_a2a", "pair_blocked_span_s")
    total = {k: sum(s[k] for rank in steady for s in rank) for k in keys}
    pair_a2a_s = total["pair_a2a"] * a2a_s
    forward, backward = shape.programs(a2a_s)
    overlap = order is not None
    sim = simulate(
        schedule, pair_costs(forward, backward, shape.w_s, overlap, order=order or "backward_first")
    )
    sim_hidden = overlapped_pair(forward, backward, order).hidden_fraction if overlap else 0.0
    return {
        "schedule": name,
        "pp": pp,
        "ep": cfg.ep,
        "microbatches": schedule.num_microbatches,
        "overlap": overlap,
        "order": order,
        "step_s": step_s,
        "simulated_s": sim.makespan,
        "ratio_vs_simulated": step_s / sim.makespan,
        "a2a_ms": a2a_s * 1e3,
        "pairs_per_rank": total["pairs"] / len(steady) / len(steady[0]),
        "a2a_per_pair": total["pair_a2a"] / max(1, total["pairs"]),
        # the all-to-alls of a pair that were waited for: launch to arrival, against a2a_ms
        "exposed_a2a_span_ms": total["pair_blocked_span_s"] / max(1, total["pair_blocked_a2a"]) * 1e3,
        "pair_exposed_ms": total["pair_exposed_s"] / max(1, total["pairs"]) * 1e3,
        "hidden_fraction": 1.0 - total["pair_exposed_s"] / pair_a2a_s if pair_a2a_s > 0 else 1.0,
        "simulated_hidden_fraction": sim_hidden,
    }


def run_synthetic(cfg: OverlapBenchConfig) -> tuple[list[dict], list[dict]]:
    """(moeforge rows, torch rows); with cfg.timelines, rank 0's last step of each case as a PNG
    beside the JSON report."""
    from moeforge.platform.launch.local_spawn import spawn_gloo

    rows, peers = [], []
    for pp in cfg.pps:
        by_rank = spawn_gloo(_synthetic_rank, pp * cfg.ep, (cfg, pp), timeout_s=cfg.timeout_s * 4)
        results = [by_rank[r] for r in sorted(by_rank)]
        torch_step = None
        if cfg.torch_peer:
            per_step = [max(r["torch"][i] for r in results) for i in range(cfg.steps)]
            torch_step = statistics.median(_steady(per_step))
            peers.append(
                {"schedule": "torch ScheduleDualPipeV", "pp": pp, "ep": cfg.ep, "step_s": torch_step}
            )
        for i, case in enumerate(results[0]["moeforge"]):
            per_rank = [r["moeforge"][i] for r in results]
            if case["order"] is None:  # overlap off: one all-to-all's time: its spans inside sequential pairs
                steady = [s for r in per_rank for s in _steady(r["steps"])]
                a2a_s = sum(s["pair_a2a_span_s"] for s in steady) / max(1, sum(s["pair_a2a"] for s in steady))
            row = _case_row(case["schedule"], pp, case["order"], per_rank, a2a_s, cfg)
            row["ratio_vs_torch"] = row["step_s"] / torch_step if torch_step else None
            row["a2a_mb"] = results[0]["a2a_numel"] * 4 / 1e6
            rows.append(row)
            if cfg.timelines:
                row["timeline"] = _plot_case(case["schedule"], case["order"], pp, per_rank, cfg.output)
    return rows, peers


def _plot_case(schedule: str, order: str | None, pp: int, per_rank: list[dict], output: str) -> str:
    """Every rank's timeline of the case's last step, written beside `output`; its path."""
    from moeforge.platform.outputs.storage import open_storage
    from moeforge.platform.outputs.timeline import TimelineRecord, plot_timeline

    records = [TimelineRecord(*r) for case in per_rank for r in case["steps"][-1].pop("records")]
    mode = order or "off"
    parent, _, report = output.rstrip("/").rpartition("/")
    name = f"{report.removesuffix('.json')}_{schedule}_pp{pp}_{mode}.png"
    title = f"{schedule} pp={pp}, overlap {mode}: synthetic phases, rank = pp_rank * ep + ep_rank"
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, name)
        plot_timeline(records, local, title=title, time_unit="seconds")
        open_storage(parent or ".").upload(local, name)
    return f"{parent}/{name}" if parent else name


# ---- real tiny model -------------------------------------------------------------------------------
def run_real(cfg: OverlapBenchConfig) -> list[dict]:
    from moeforge.platform.bench.pipeline import PipelineBenchConfig, _real_config
    from moeforge.platform.launch.local_spawn import spawn_gloo
    from moeforge.platform.train.pipeline import train_from_dict

    base = PipelineBenchConfig(
        real_model=cfg.real_model,
        real_microbatches=cfg.real_microbatches,
        real_global_batch=cfg.real_global_batch,
        real_steps=cfg.real_steps,
    )
    variants = [
        ("one graph", False, False),
        ("phases, sequential", True, False),
        ("phases, overlapped", True, True),
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="moeforge-bench-overlap-") as tmp:
        for label, phases, overlap in variants:
            run_dir = os.path.join(tmp, label.replace(" ", "_").replace(",", ""))
            raw = _real_config(base, run_dir, "dualpipe", 2)
            raw["parallel"].update(dp=2, ep=2, chunk_phases=phases, overlap=overlap)
            spawn_gloo(train_from_dict, 4, (copy.deepcopy(raw), True), timeout_s=cfg.timeout_s * 4)
            with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                steady = _steady([json.loads(line) for line in f if line.strip()])
            rows.append(
                {
                    "variant": label,
                    "tokens_per_s": statistics.median(r["tokens"] / r["step_time_s"] for r in steady),
                    "exposed_a2a_ms": statistics.median(r.get("exposed_a2a_s", 0.0) for r in steady) * 1e3,
                    "exposed_p2p_ms": statistics.median(r["exposed_comm_s"] for r in steady) * 1e3,
                    "final_loss": steady[-1]["loss"],
                }
            )
    return rows


# ---- job ---------------------------------------------------------------------------------------------
def run_benchmark(cfg: OverlapBenchConfig) -> dict:
    rows, peers = run_synthetic(cfg)
    return {
        "config": dataclasses.asdict(cfg),
        "cpu_count": os.cpu_count(),
        "synthetic": rows,
        "torch": peers,
        "real": run_real(cfg) if cfg.real else [],
    }


def format_table(report: dict) -> str:
    cfg = report["config"]
    lines = [
        (
            f"synthetic stages: {cfg['layers_per_stage']} MoE layers, phases attn {cfg['attn_ms']} ms / experts "
            f"{cfg['experts_ms']} ms / tail {cfg['tail_ms']} ms, backward x{cfg['backward_factor']} "
            f"(W {cfg['w_fraction']:.0%}), all-to-alls over gloo sized for {cfg['a2a_ms']} ms, ep={cfg['ep']}"
        ),
        (
            f"{'schedule':<24} {'pp':>3} {'M':>3} {'overlap':>14} {'step s':>7} {'sim s':>7} {'/sim':>5} "
            f"{'a2a MB':>6} {'a2a ms':>6} {'waited a2a ms':>13} {'pair exp ms':>11} {'hidden':>6} {'sim hid':>7} {'/torch':>6}"
        ),
    ]
    for r in report["synthetic"]:
        vs_torch = f"{r['ratio_vs_torch']:>6.2f}" if r["ratio_vs_torch"] else f"{'-':>6}"
        lines.append(
            f"{r['schedule']:<24} {r['pp']:>3} {r['microbatches']:>3} {r['order'] or 'off':>14} "
            f"{r['step_s']:>7.3f} {r['simulated_s']:>7.3f} {r['ratio_vs_simulated']:>5.2f} {r['a2a_mb']:>6.1f} {r['a2a_ms']:>6.1f} {r['exposed_a2a_span_ms']:>13.1f} "
            f"{r['pair_exposed_ms']:>11.1f} {r['hidden_fraction']:>6.0%} {r['simulated_hidden_fraction']:>7.0%} "
            f"{vs_torch}"
        )
    for p in report["torch"]:
        lines.append(f"{p['schedule']:<24} {p['pp']:>3} {'':>3} {'(none)':>14} {p['step_s']:>7.3f}")
    return "\n".join(lines + _real_table(report["real"]))


def _real_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    head = f"{'variant':<20} {'tok/s':>8} {'a2a wait ms':>11} {'p2p wait ms':>11} {'loss':>7}"
    body = [
        f"{r['variant']:<20} {r['tokens_per_s']:>8.0f} {r['exposed_a2a_ms']:>11.1f} "
        f"{r['exposed_p2p_ms']:>11.1f} {r['final_loss']:>7.3f}"
        for r in rows
    ]
    return ["real tiny model, dualpipe pp=2 x dp=2 x ep=2 (steady steps)", head, *body]


def run_job(values: dict) -> str:
    """`moeforge-bench overlap`: config dict -> run, write the JSON report, return the table."""
    cfg = OverlapBenchConfig.from_dict(values)
    report = run_benchmark(cfg)
    return write_report(cfg.output, report, format_table(report))
