"""Rank 0 of a pipeline run: progress lines, metrics.jsonl, the measured timeline and the summary.

Writes the same files as the reference loop (platform/run_outputs.py: config.yaml, metrics.jsonl,
summary.json) plus `timeline.png` and `timeline.json` (Chrome/Perfetto trace) of the last gathered
step, drawn by platform/timeline.py from the measured records.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable

from moeforge.platform.config.train import TrainConfig
from moeforge.platform.metrics import TrainSummary, format_duration, format_progress
from moeforge.platform.run_outputs import RunOutputs
from moeforge.platform.storage import open_storage
from moeforge.platform.timeline import plot_timeline, write_chrome_trace
from moeforge.platform.tracking import make_tracker

COMPUTE_KINDS = {"F", "B", "W", "BW", "FB", "WAIT"}


class PipelineReporter:
    def __init__(self, cfg: TrainConfig, runtime, log: Callable[[str], None]) -> None:
        self.cfg, self.runtime, self.log = cfg, runtime, log
        self.outputs = RunOutputs(cfg.run.dir)
        self.outputs.write_config(dataclasses.asdict(cfg))
        self.tracker = make_tracker(cfg.tracking, dataclasses.asdict(cfg), rank=0)
        self.storage = open_storage(cfg.run.dir)
        self.losses: list[float] = []
        self.history: list[dict] = []
        self.start = time.perf_counter()
        self.window_start, self.window_tokens = self.start, 0
        self.timeline_png: str | None = None
        self.timeline_trace: str | None = None
        par = cfg.parallel
        n_params = sum(p.numel() for p in runtime.module.parameters())
        log(
            f"moeforge pipeline: {par.schedule} pp={par.pp} dp={par.dp} ZeRO-{par.zero_stage}, "
            f"{par.microbatches} micro-batches/replica, {cfg.run.steps} steps, rank 0 holds "
            f"{n_params / 1e6:.2f}M params, run.dir={cfg.run.dir}"
        )

    def record(self, m) -> dict:
        """Record, draw and print one step; return its scalar metrics (for Ray Train's report)."""
        steps = self.cfg.run.steps
        record = m.to_dict()
        self.losses.append(m.base.loss)
        self.history.append(record)
        self.outputs.append_metrics(record)
        self.window_tokens += m.base.tokens
        if m.records:
            self._write_timeline(m.records, m.base.step)
        if m.base.step % self.cfg.run.log_every == 0 or m.base.step == steps:
            now = time.perf_counter()
            tok_s = self.window_tokens / max(now - self.window_start, 1e-9)
            eta = (steps - m.base.step) * (now - self.start) / m.base.step
            self.log(
                format_progress(m.base, steps, tok_s, eta)
                + f" | bubble {m.bubble_fraction:.0%} | exposed comm {max(m.exposed_comm_s) * 1e3:.1f} ms"
                + (f" | MFU {m.mfu:.1%}" if m.mfu else "")
            )
            self.outputs.flush()
            self.window_start, self.window_tokens = now, 0
        scalars = {k: v for k, v in record.items() if not isinstance(v, list)}
        self.tracker.log(m.base.step, scalars)
        return scalars

    def _write_timeline(self, records, step: int) -> None:
        compute = [r for r in records if r.kind in COMPUTE_KINDS]
        with tempfile.TemporaryDirectory() as tmp:
            png, trace = os.path.join(tmp, "timeline.png"), os.path.join(tmp, "timeline.json")
            par = self.cfg.parallel
            title = f"{par.schedule} pp={par.pp} dp={par.dp}, step {step} (measured)"
            plot_timeline(compute, png, title=title, time_unit="s")
            write_chrome_trace(records, trace)
            self.tracker.log_image(step, "timeline", png)
            self.storage.upload(png, "timeline.png")
            self.storage.upload(trace, "timeline.json")
        self.timeline_png = self.storage.url("timeline.png")
        self.timeline_trace = self.storage.url("timeline.json")

    def finish(self) -> dict:
        elapsed = time.perf_counter() - self.start
        tokens_per_step = self.cfg.data.global_batch * self.cfg.model.seq_len
        summary = TrainSummary(
            steps=len(self.losses),
            first_loss=self.losses[0],
            final_loss=self.losses[-1],
            tokens_per_s=len(self.losses) * tokens_per_step / max(elapsed, 1e-9),
            elapsed_s=elapsed,
            losses=self.losses,
        ).to_dict()
        last = self.history[-1]
        # The first step pays for warm-up (allocations, DeepSpeed's first step): report bubble and
        # exposed communication as means over the later steps when there are any.
        steady = self.history[1:] or self.history
        summary.update(
            schedule=self.cfg.parallel.schedule,
            pp=self.cfg.parallel.pp,
            dp=self.cfg.parallel.dp,
            zero_stage=self.cfg.parallel.zero_stage,
            bubble_fraction=sum(h["bubble_fraction"] for h in steady) / len(steady),
            exposed_comm_s=sum(h["exposed_comm_s"] for h in steady) / len(steady),
            mfu=last["mfu"],
            grad_norm=last["grad_norm"],
            timeline_png=self.timeline_png,
            timeline_trace=self.timeline_trace,
            params_dir=self.storage.url("params"),
        )
        self.outputs.write_summary(summary)
        self.tracker.finish({k: v for k, v in summary.items() if k != "losses"})
        self.log(
            f"done: {summary['steps']} steps in {format_duration(elapsed)} | loss {summary['first_loss']:.4f} -> "
            f"{summary['final_loss']:.4f} | {summary['tokens_per_s']:,.0f} tok/s | bubble "
            f"{summary['bubble_fraction']:.0%} | timeline {self.timeline_png}"
        )
        return summary
