"""Rank 0 of a pipeline run: progress lines, metrics.jsonl, the measured timeline and the summary.

Writes the same files as the reference loop (platform/outputs/run_files.py: config.yaml, metrics.jsonl,
summary.json) plus `timeline.png` and `timeline.json` (Chrome/Perfetto trace) of the last gathered
step, drawn by platform/outputs/timeline.py from the measured records.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable

from moeforge.platform.config.train import TrainConfig
from moeforge.platform.outputs.metrics import TrainSummary, format_progress
from moeforge.platform.outputs.run_files import RunOutputs
from moeforge.platform.outputs.storage import open_storage
from moeforge.platform.outputs.timeline import plot_timeline, write_chrome_trace
from moeforge.platform.outputs.tracking import make_tracker

COMPUTE_KINDS = {"F", "B", "W", "BW", "FB", "WAIT"}


class PipelineReporter:
    """Rank 0's records of a pipeline run (`resumed_from`: the checkpoint path the run resumed
    from, whose metrics lines are kept and continued)."""

    def __init__(
        self, cfg: TrainConfig, runtime, log: Callable[[str], None], resumed_from: str | None = None
    ) -> None:
        self.cfg, self.runtime, self.log = cfg, runtime, log
        self.outputs = RunOutputs(cfg.run.dir, fresh=False)
        kept = self.outputs.start_metrics(runtime.step)  # a resumed run keeps the lines its checkpoint covers
        self.outputs.write_config(dataclasses.asdict(cfg))
        self.tracker = make_tracker(cfg.tracking, dataclasses.asdict(cfg), rank=0)
        self.storage = open_storage(cfg.run.dir)
        self.losses: list[float] = [r["loss"] for r in kept]  # the whole run's, resumed part included
        self.eval_loss: float | None = next(
            (r["eval_loss"] for r in reversed(kept) if r.get("eval_loss") is not None), None
        )
        self.history: list[dict] = []  # this segment's records
        self.start_step = runtime.step
        self.resumed_from_step = runtime.step if resumed_from else None
        self.last_checkpoint: str | None = resumed_from
        self.start = time.perf_counter()
        self.window_start, self.window_tokens = self.start, 0
        self.timeline_png: str | None = None
        self.timeline_trace: str | None = None
        par = cfg.parallel
        n_params = sum(p.numel() for p in runtime.module.parameters())
        log(
            f"moeforge pipeline: {par.schedule} pp={par.pp} dp={par.dp} ZeRO-{par.zero_stage}, "
            f"{par.microbatches} micro-batches/replica, {cfg.run.steps} steps, rank 0 holds "
            f"{n_params / 1e6:.2f}M params, precision {cfg.precision.name}, run.dir={cfg.run.dir}"
        )
        if resumed_from:
            log(f"resumed from {resumed_from} at step {runtime.step}")

    def record(self, m, eval_loss: float | None = None) -> dict:
        """Record, draw and print one step; return its scalar metrics (for Ray Train's report)."""
        steps = self.cfg.run.steps
        record = m.to_dict()
        if eval_loss is not None:
            record["eval_loss"] = self.eval_loss = eval_loss
        self.losses.append(m.base.loss)
        self.history.append(record)
        self.outputs.append_metrics(record)
        self.window_tokens += m.base.tokens
        if m.records:
            self._write_timeline(m.records, m.base.step)
        if m.base.step % self.cfg.run.log_every == 0 or m.base.step == steps:
            now = time.perf_counter()
            tok_s = self.window_tokens / max(now - self.window_start, 1e-9)
            eta = (steps - m.base.step) * (now - self.start) / max(m.base.step - self.start_step, 1)
            self.log(
                format_progress(m.base, steps, tok_s, eta, mfu=m.mfu or None)
                + f" | bubble {m.bubble_fraction:.0%} | exposed comm {max(m.exposed_comm_s) * 1e3:.1f} ms"
            )
            self.outputs.flush()
            self.window_start, self.window_tokens = now, 0
        if eval_loss is not None:
            self.log(f"eval at step {m.base.step}: loss {eval_loss:.4f}")
        scalars = {k: v for k, v in record.items() if not isinstance(v, list)}
        self.tracker.log(m.base.step, scalars)
        return scalars

    def checkpointed(self, step: int, path: str) -> None:
        self.last_checkpoint = path
        self.log(f"checkpoint at step {step}: {path}")

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

    def _summary(self, **status) -> TrainSummary:
        elapsed = time.perf_counter() - self.start
        tokens_per_step = self.cfg.data.global_batch * self.cfg.model.seq_len
        return TrainSummary(
            steps=self.start_step + len(self.history),
            first_loss=self.losses[0] if self.losses else None,
            final_loss=self.losses[-1] if self.losses else None,
            tokens_per_s=len(self.history) * tokens_per_step / max(elapsed, 1e-9),
            elapsed_s=elapsed,
            eval_loss=self.eval_loss,
            losses=list(self.losses),
            resumed_from_step=self.resumed_from_step,
            checkpoint=self.last_checkpoint,
            **status,
        )

    def _pipeline_fields(self) -> dict:
        par = self.cfg.parallel
        fields = {
            "schedule": par.schedule,
            "pp": par.pp,
            "dp": par.dp,
            "zero_stage": par.zero_stage,
            "timeline_png": self.timeline_png,
            "timeline_trace": self.timeline_trace,
        }
        if self.history:
            # The first step pays for warm-up (allocations, DeepSpeed's first step): report bubble
            # and exposed communication as means over the later steps when there are any.
            steady = self.history[1:] or self.history
            fields.update(
                bubble_fraction=sum(h["bubble_fraction"] for h in steady) / len(steady),
                exposed_comm_s=sum(h["exposed_comm_s"] for h in steady) / len(steady),
                mfu=self.history[-1]["mfu"],
                grad_norm=self.history[-1]["grad_norm"],
            )
        return fields

    def finish(self) -> dict:
        result = self._summary()
        summary = result.to_dict()
        summary.update(self._pipeline_fields(), params_dir=self.storage.url("params"))
        self.outputs.write_summary(summary)
        self.tracker.finish({k: v for k, v in summary.items() if k != "losses"})
        line = result.format()
        if "bubble_fraction" in summary:
            line += f" | bubble {summary['bubble_fraction']:.0%}"
        if summary.get("mfu"):
            line += f" | mfu {100 * summary['mfu']:.1f}%"
        self.log(line + f" | timeline {self.timeline_png}")
        return summary

    def fail(self, err: BaseException) -> None:
        """Record a failed run: metrics so far, summary.json with status "failed" and this rank's
        error, the tracker's summary. Never raises (the caller re-raises `err`)."""
        result = self._summary(status="failed", error=f"{type(err).__name__}: {err}")
        summary = result.to_dict()
        summary.update(self._pipeline_fields())
        for what, action in (
            ("metrics", self.outputs.flush),
            ("summary.json", lambda: self.outputs.write_summary(summary)),
            ("the tracker", lambda: self.tracker.finish({k: v for k, v in summary.items() if k != "losses"})),
        ):
            try:
                action()
            except Exception as record_err:  # noqa: BLE001 - reported; the original error wins
                self.log(f"could not record {what} after the failure: {record_err}")
        self.log(result.format())
