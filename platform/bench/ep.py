"""Expert-parallel all-to-all (`moeforge-bench ep`): bytes and time of the MoE dispatch and combine.

A real all-to-all over gloo between `ep` local processes (`platform.launch.local_spawn.spawn_gloo`),
through the training path's own code, not a re-implementation:

    routing     per rank, `tokens_per_rank` tokens, each with top-k distinct expert ids drawn
                uniformly at random (seeded per rank), not the model's router: with uniform routing
                a token reaches a rank with probability 1 - C(E - E/ep, k) / C(E, k)
    plan        `platform.moe.dispatch.plan_dispatch` on `platform.moe.expert_placement.ExpertPlacement`: the
                unique (token, rank) pairs, each token sent to a rank once however many of its
                experts live there; counts exchanged once (exchange_counts), not timed
    payloads    (the collectives of `platform.moe.dispatch` that `AllToAllDispatch` calls)
                fp8 dispatch   dispatch_rows_fp8 of the pairs' BF16 rows: e4m3 + 1x128 scales packed
                               as uint8 rows of D + D/128 bytes; the time INCLUDES the compression
                               before and the decompression to BF16 after the exchange
                bf16 dispatch  all_to_all_rows of the same BF16 rows (precision without FP8)
                bf16 combine   all_to_all_rows of the received rows back to their senders (the
                               expert outputs' shape and dtype; the per-token sum is not timed)
                routing fp32   all_to_all_rows of [pairs, 2k] fp32 (gate weights and local expert
                               ids), which AllToAllDispatch sends beside the hidden rows

Bytes are measured, not computed: every torch.distributed.all_to_all_single call is recorded (input
tensor, element size, split sizes) on the first warm-up call, and a rank's wire bytes are the rows
it actually sent to the OTHER ranks times their row bytes (self-sends excluded, as DeepEP's
accounting excludes the local rank); `incl self` adds the rows a rank sends to itself. Figures per
rank are means over the ranks. Time: each repeat starts after a barrier; the collective's time is
the slowest rank's; the median of `repeats` after `warmup` calls (one torch thread per process; on
a machine with fewer cores than ranks the processes share them).

Projection (not a measurement): the measured wire bytes per token times `projection_tokens` at
DeepEP's published normal-kernel link rates (github.com/deepseek-ai/DeepEP README, Performance:
H800, V3 pretraining setting of 4096 tokens, hidden 7168, top-8, FP8 dispatch, BF16 combine;
intra-node NVLink 153 GB/s dispatch / 158 GB/s combine at EP8, inter-node RDMA 43-58 GB/s at
EP16-64; that V1 table now lives in DeepEP's own docs/legacy.md). Prints a table, writes JSON.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform as std_platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from moeforge.platform.config.builder import build, require
from moeforge.platform.outputs.storage import write_text_file

PAYLOADS = ("fp8 dispatch", "bf16 dispatch", "bf16 combine", "routing fp32")
DEEPEP_SOURCE = "deepseek-ai/DeepEP README (normal kernels, H800)"


@dataclass
class EPBenchConfig:
    """conf/bench_ep.yaml."""

    hidden: int = 7168  # DeepSeek-V3's hidden size
    n_experts: int = 256
    top_k: int = 8
    tokens_per_rank: int = 4096
    eps: list[int] = field(default_factory=lambda: [2, 4])
    warmup: int = 1  # untimed calls per payload (the first one records the bytes)
    repeats: int = 5  # timed calls per payload; the median is reported
    seed: int = 0
    nvlink_gbps: float = 155.0  # DeepEP intra-node (NVLink) bottleneck bandwidth, GB/s
    rdma_gbps: float = 50.0  # DeepEP inter-node (RDMA) bottleneck bandwidth, GB/s
    projection_tokens: int = 4096  # tokens per projected dispatch
    timeout_s: float = 300.0
    output: str = "runs/bench/ep.json"  # local path or s3:// URL

    def __post_init__(self) -> None:
        self.eps = list(self.eps)
        require(
            self.hidden >= 128 and self.hidden % 128 == 0,
            "hidden",
            f"must be a positive multiple of 128 (FP8 1x128 tiles), got {self.hidden}",
        )
        require(self.n_experts >= 1, "n_experts", f"must be >= 1, got {self.n_experts}")
        require(
            1 <= self.top_k <= self.n_experts,
            "top_k",
            f"must lie in [1, n_experts={self.n_experts}], got {self.top_k}",
        )
        require(self.tokens_per_rank >= 1, "tokens_per_rank", f"must be >= 1, got {self.tokens_per_rank}")
        require(bool(self.eps), "eps", "needs at least one EP size, e.g. [2, 4]")
        for ep in self.eps:
            require(ep >= 2, "eps", f"EP sizes must be >= 2 (one rank exchanges nothing), got {ep}")
            require(
                self.n_experts % ep == 0,
                "eps",
                f"n_experts ({self.n_experts}) must be divisible by ep ({ep})",
            )
        require(len(set(self.eps)) == len(self.eps), "eps", f"must not repeat a size, got {self.eps}")
        require(
            self.warmup >= 1, "warmup", f"must be >= 1 (the first call records the bytes), got {self.warmup}"
        )
        require(self.repeats >= 1, "repeats", f"must be >= 1, got {self.repeats}")
        require(self.nvlink_gbps > 0, "nvlink_gbps", f"must be > 0, got {self.nvlink_gbps}")
        require(self.rdma_gbps > 0, "rdma_gbps", f"must be > 0, got {self.rdma_gbps}")
        require(
            self.projection_tokens >= 1, "projection_tokens", f"must be >= 1, got {self.projection_tokens}"
        )
        require(self.timeout_s > 0, "timeout_s", f"must be > 0, got {self.timeout_s}")
        require(bool(self.output), "output", "must be a file path or s3:// URL")


# ---- what goes on the wire -----------------------------------------------------------------------
@contextlib.contextmanager
def record_exchanges() -> Iterator[list[dict]]:
    """Record every torch.distributed.all_to_all_single call made inside (the EP collectives call it
    through the module attribute): per call, the input's dtype, bytes per row and rows per
    destination rank."""
    import torch.distributed as dist

    calls: list[dict] = []
    original = dist.all_to_all_single

    def recording(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        group = kwargs.get("group", args[0] if args else None)
        world = dist.get_world_size(group)
        rows = input.shape[0] if input.dim() else 1
        splits = list(input_split_sizes) if input_split_sizes else [rows // world] * world
        calls.append(
            {
                "dtype": str(input.dtype).removeprefix("torch."),
                "row_bytes": math.prod(input.shape[1:]) * input.element_size(),
                "rows_to_rank": [int(n) for n in splits],
            }
        )
        return original(output, input, output_split_sizes, input_split_sizes, *args, **kwargs)

    dist.all_to_all_single = recording
    try:
        yield calls
    finally:
        dist.all_to_all_single = original


def _uniform_top_k(n_tokens: int, n_experts: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """[n_tokens, k] distinct expert ids per token, uniform over the k-subsets."""
    return torch.rand(n_tokens, n_experts, generator=generator).topk(k, dim=1).indices


def _timed(op: Callable[[], Any], repeats: int) -> list[float]:
    import torch.distributed as dist

    times = []
    for _ in range(repeats):
        dist.barrier()
        started = time.perf_counter()
        op()
        times.append(time.perf_counter() - started)
    return times


def _ep_rank(rank: int, world_size: int, cfg: EPBenchConfig) -> dict:
    """One EP rank: plan the dispatch of its tokens, then record and time each payload."""
    from moeforge.kernels.token_compress import compress_tokens, decompress_tokens
    from moeforge.platform.moe.dispatch import (
        all_to_all_rows,
        dispatch_rows_fp8,
        exchange_counts,
        fp8_row_bytes,
        plan_dispatch,
    )
    from moeforge.platform.moe.expert_placement import ExpertPlacement

    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank)
    placement = ExpertPlacement(cfg.n_experts, world_size, rank)
    expert_ids = _uniform_top_k(cfg.tokens_per_rank, cfg.n_experts, cfg.top_k, generator)
    x = torch.randn(cfg.tokens_per_rank, cfg.hidden, generator=generator).to(torch.bfloat16)

    with torch.no_grad():
        plan = plan_dispatch(expert_ids, placement)
        recv_counts = exchange_counts(plan.send_counts, None)
        send, recv = plan.send_counts.tolist(), recv_counts.tolist()
        rows = x[plan.pair_token]  # [P, hidden] BF16: what the dispatch sends
        received = all_to_all_rows(rows, send, recv, None)  # [R, hidden]: the combine's shape
        routing = torch.zeros(rows.shape[0], 2 * cfg.top_k, dtype=torch.float32)

        ops: dict[str, Callable[[], Any]] = {
            "fp8 dispatch": lambda: dispatch_rows_fp8(rows, send, recv, None, torch.bfloat16),
            "bf16 dispatch": lambda: all_to_all_rows(rows, send, recv, None),
            "bf16 combine": lambda: all_to_all_rows(received, recv, send, None),
            "routing fp32": lambda: all_to_all_rows(routing, send, recv, None),
        }
        payloads = {}
        for name, op in ops.items():
            with record_exchanges() as calls:
                op()
            if len(calls) != 1:
                raise RuntimeError(f"{name}: expected one all-to-all, recorded {len(calls)}")
            for _ in range(cfg.warmup - 1):
                op()
            payloads[name] = {**calls[0], "times_s": _timed(op, cfg.repeats)}
        if payloads["fp8 dispatch"]["row_bytes"] != fp8_row_bytes(cfg.hidden):
            raise RuntimeError(
                f"fp8 dispatch sent rows of {payloads['fp8 dispatch']['row_bytes']} bytes, "
                f"fp8_row_bytes({cfg.hidden}) = {fp8_row_bytes(cfg.hidden)}"
            )
        # the FP8 codec alone, on this rank's rows (its share of the fp8 dispatch time)
        codec_times = _timed(lambda: decompress_tokens(*compress_tokens(rows), torch.bfloat16), cfg.repeats)
    return {
        "rank": rank,
        "pairs": int(rows.shape[0]),
        "ranks_per_token": float(plan.send_mask.sum(dim=1).float().mean()),
        "send_rows": send,
        "recv_rows": recv,
        "payloads": payloads,
        "codec_times_s": codec_times,
    }


# ---- figures per ep --------------------------------------------------------------------------------
def _collective_time(per_rank: list[list[float]]) -> float:
    """Median over repeats of the slowest rank's time."""
    return statistics.median(max(times) for times in zip(*per_rank, strict=True))


def summarize(ep: int, ranks: list[dict], cfg: EPBenchConfig) -> list[dict]:
    """One row per payload from the ranks' records (see module docstring)."""
    rows = []
    for name in PAYLOADS:
        recs = [r["payloads"][name] for r in ranks]
        row_bytes = recs[0]["row_bytes"]
        to_others = [
            sum(n for dest, n in enumerate(p["rows_to_rank"]) if dest != r) for r, p in enumerate(recs)
        ]
        to_all = [sum(p["rows_to_rank"]) for p in recs]
        wire = [n * p["row_bytes"] for n, p in zip(to_others, recs, strict=True)]
        incl = [n * p["row_bytes"] for n, p in zip(to_all, recs, strict=True)]
        time_s = _collective_time([p["times_s"] for p in recs])
        per_token = statistics.fmean(wire) / cfg.tokens_per_rank
        rows.append(
            {
                "ep": ep,
                "payload": name,
                "dtype": recs[0]["dtype"],
                "row_bytes": row_bytes,
                "rows_to_others_per_rank": statistics.fmean(to_others),
                "wire_bytes_per_rank": statistics.fmean(wire),
                "wire_bytes_max_rank": max(wire),
                "wire_bytes_total": sum(wire),
                "bytes_incl_self_per_rank": statistics.fmean(incl),
                "bytes_incl_self_total": sum(incl),
                "wire_bytes_per_token": per_token,
                "bytes_per_token_incl_self": statistics.fmean(incl) / cfg.tokens_per_rank,
                "time_s": time_s,
                "wire_gb_per_s": statistics.fmean(wire) / time_s / 1e9,
                "codec_s": _collective_time([r["codec_times_s"] for r in ranks])
                if name == "fp8 dispatch"
                else None,
                "projected_nvlink_s": per_token * cfg.projection_tokens / (cfg.nvlink_gbps * 1e9),
                "projected_rdma_s": per_token * cfg.projection_tokens / (cfg.rdma_gbps * 1e9),
                "per_rank": [
                    {"rank": r, "rows_to_rank": p["rows_to_rank"], "wire_bytes": w, "times_s": p["times_s"]}
                    for r, (p, w) in enumerate(zip(recs, wire, strict=True))
                ],
            }
        )
    bf16 = next(r for r in rows if r["payload"] == "bf16 dispatch")
    for r in rows:
        r["vs_bf16_dispatch"] = r["wire_bytes_total"] / bf16["wire_bytes_total"]
    return rows


def run(cfg: Mapping[str, Any] | EPBenchConfig | None = None, log: Callable[[str], None] = print) -> dict:
    """Run every ep, log the table, write JSON to cfg.output; return the report."""
    from moeforge.platform.launch.local_spawn import spawn_gloo
    from moeforge.platform.moe.dispatch import fp8_row_bytes

    if not isinstance(cfg, EPBenchConfig):
        cfg = build(EPBenchConfig, dict(cfg or {}), "bench.ep")
    started = time.perf_counter()
    rows, eps = [], []
    for ep in cfg.eps:
        results = spawn_gloo(_ep_rank, ep, (cfg,), timeout_s=cfg.timeout_s)
        ranks = [results[r] for r in range(ep)]
        rows.extend(summarize(ep, ranks, cfg))
        eps.append(
            {
                "ep": ep,
                "experts_per_rank": cfg.n_experts // ep,
                "pairs_per_rank": statistics.fmean(r["pairs"] for r in ranks),
                "ranks_per_token": statistics.fmean(r["ranks_per_token"] for r in ranks),
                "expected_ranks_per_token": ep * (1 - _no_expert_on_rank(cfg.n_experts, ep, cfg.top_k)),
                "send_rows": [r["send_rows"] for r in ranks],
            }
        )
    by = {(r["ep"], r["payload"]): r for r in rows}
    summary = {
        str(ep): {
            "fp8_over_bf16_dispatch_bytes": by[ep, "fp8 dispatch"]["vs_bf16_dispatch"],
            "expected_fp8_over_bf16": fp8_row_bytes(cfg.hidden) / (2 * cfg.hidden),
            "combine_equals_bf16_dispatch_bytes": by[ep, "bf16 combine"]["wire_bytes_total"]
            == by[ep, "bf16 dispatch"]["wire_bytes_total"],
        }
        for ep in cfg.eps
    }
    report = {
        "benchmark": "ep",
        "config": asdict(cfg),
        "routing": "uniform random top-k (seeded per rank), not the model's router",
        "projection_source": DEEPEP_SOURCE,
        "host": {
            "cpus": os.cpu_count(),
            "threads_per_rank": 1,
            "torch": torch.__version__,
            "python": std_platform.python_version(),
            "backend": "gloo",
        },
        "eps": eps,
        "rows": rows,
        "summary": summary,
        "seconds": time.perf_counter() - started,
    }
    log(format_table(report))
    write_text_file(cfg.output, json.dumps(report, indent=1) + "\n")  # local path or s3://
    log(f"wrote {cfg.output}")
    return report


def _no_expert_on_rank(n_experts: int, ep: int, k: int) -> float:
    """P(none of a token's k distinct uniform experts is on a given rank) = C(E - E/ep, k) / C(E, k)."""
    return math.comb(n_experts - n_experts // ep, k) / math.comb(n_experts, k)


def format_table(report: dict) -> str:
    cfg, host = report["config"], report["host"]
    lines = [
        (
            f"ep all-to-all over gloo ({host['cpus']} cpus, 1 thread per rank): hidden {cfg['hidden']}, "
            f"top-{cfg['top_k']} of {cfg['n_experts']} experts, uniform random routing (seed {cfg['seed']}), "
            f"{cfg['tokens_per_rank']} tokens per rank; median of {cfg['repeats']} after {cfg['warmup']} warm-up"
        ),
        (
            "bytes: measured rows sent to the OTHER ranks x row bytes, per rank (incl self: with self-sends); "
            "time: slowest rank after a barrier; fp8 includes compress + decompress (codec: that part alone)"
        ),
        (
            f"{'ep':>3} {'payload':<13} {'dtype':<8} {'B/row':>6} {'rows/rank':>9} {'MB/rank':>8} "
            f"{'MB incl self':>12} {'B/token':>8} {'vs bf16':>7} {'time ms':>8} {'GB/s':>6} {'codec ms':>8}"
        ),
    ]
    for r in report["rows"]:
        codec = "-" if r["codec_s"] is None else f"{r['codec_s'] * 1e3:.1f}"
        lines.append(
            f"{r['ep']:>3} {r['payload']:<13} {r['dtype']:<8} {r['row_bytes']:>6} "
            f"{r['rows_to_others_per_rank']:>9.0f} {r['wire_bytes_per_rank'] / 1e6:>8.2f} "
            f"{r['bytes_incl_self_per_rank'] / 1e6:>12.2f} {r['wire_bytes_per_token']:>8.0f} "
            f"{r['vs_bf16_dispatch']:>7.3f} {r['time_s'] * 1e3:>8.1f} {r['wire_gb_per_s']:>6.2f} {codec:>8}"
        )
    for e in report["eps"]:
        s = report["summary"][str(e["ep"])]
        lines.append(
            f"ep={e['ep']}: {e['ranks_per_token']:.3f} ranks per token (uniform: {e['expected_ranks_per_token']:.3f}); "
            f"fp8/bf16 dispatch bytes {s['fp8_over_bf16_dispatch_bytes']:.4f} "
            f"((D + D/128) / 2D = {s['expected_fp8_over_bf16']:.4f}); combine bytes = bf16 dispatch bytes: "
            f"{'yes' if s['combine_equals_bf16_dispatch_bytes'] else 'NO'}"
        )
    lines += [
        (
            f"PROJECTION, not a measurement: measured B/token x {cfg['projection_tokens']} tokens at {report['projection_source']} "
            f"link rates, NVLink {cfg['nvlink_gbps']:g} GB/s (intra-node), RDMA {cfg['rdma_gbps']:g} GB/s (inter-node)"
        ),
        f"{'ep':>3} {'payload':<13} {'B/token':>8} {'NVLink ms':>9} {'RDMA ms':>8}",
    ]
    for r in report["rows"]:
        lines.append(
            f"{r['ep']:>3} {r['payload']:<13} {r['wire_bytes_per_token']:>8.0f} "
            f"{r['projected_nvlink_s'] * 1e3:>9.3f} {r['projected_rdma_s'] * 1e3:>8.3f}"
        )
    return "\n".join(lines)


def run_job(values: Mapping[str, Any]) -> str:
    """`moeforge-bench ep`: the composed conf/bench_ep.yaml in, the text to print out."""
    lines: list[str] = []
    run(values, log=lines.append)
    return "\n".join(lines)
