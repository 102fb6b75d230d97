"""Rank 0's record of a pipeline run: the run report every loop keeps, plus the pipeline's own.

On top of `platform.outputs.run_report.RunReport` (config, metrics.jsonl, progress, tracker, summary, the
failure record) a pipeline run adds `timeline.png` and `timeline.json` (Chrome/Perfetto trace) of the
last gathered step, drawn by `platform.outputs.timeline.plot_timeline` from the measured records, the
bubble and exposed communication on the progress line, and its layout and measured figures in
summary.json.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

from moeforge.platform.config.train import TrainConfig
from moeforge.platform.outputs.metrics import EvalResult
from moeforge.platform.outputs.run_report import RunReport
from moeforge.platform.outputs.timeline import plot_timeline, write_chrome_trace

COMPUTE_KINDS = {"F", "B", "W", "BW", "FB", "WAIT"}
# Drawing a timeline takes rank 0 seconds of matplotlib while the other ranks wait for it at their
# next transfer, so a gathered step is drawn at most this often; the trace is written at every one,
# and the last gathered step is drawn when the run ends.
TIMELINE_PNG_EVERY_S = 300.0


class PipelineReport(RunReport):
    """A RunReport for a pipeline run on rank 0. `rank_params`: parameters rank 0 holds, for the
    header line; `flops_per_token` / `peak_flops` as RunReport's (peak over all workers)."""

    def __init__(
        self,
        cfg: TrainConfig,
        rank_params: int,
        log: Callable[[str], None],
        start_step: int = 0,
        resumed_from: str | None = None,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
    ) -> None:
        par = cfg.parallel
        header = (
            f"moeforge pipeline: {par.schedule} pp={par.pp} dp={par.dp}"
            + (f" ep={par.ep}" if par.ep > 1 else "")
            + f" ZeRO-{par.zero_stage}, "
            f"{par.microbatches} micro-batches/replica, {cfg.run.steps} steps, rank 0 holds "
            f"{rank_params / 1e6:.2f}M params, precision {cfg.precision.name}, run.dir={cfg.run.dir}"
        )
        super().__init__(cfg, header, log, start_step, resumed_from, flops_per_token, peak_flops)
        self.storage = self.outputs.storage
        self.history: list[dict] = []  # this segment's pipeline figures, per step
        self.timeline_png: str | None = None
        self.timeline_trace: str | None = None
        self.last_grad_norm: float | None = None
        self._undrawn: tuple[list, int] | None = None  # the last gathered step, if not drawn yet
        self._drawn_at = time.monotonic()

    def record_step(self, m, evaluation: EvalResult | None = None) -> dict[str, Any]:  # type: ignore[override]
        """Record one step's PipelineStepMetrics (and its evaluation); return its scalars."""
        pipeline = m.pipeline_fields()
        self.history.append(pipeline)
        self.last_grad_norm = m.base.grad_norm
        if m.records:
            self._write_trace(m.records)
            self._undrawn = (m.records, m.base.step)
            if time.monotonic() - self._drawn_at >= TIMELINE_PNG_EVERY_S:
                self._draw_timeline()
        suffix = f" | bubble {m.bubble_fraction:.0%} | exposed comm {max(m.exposed_comm_s) * 1e3:.1f} ms"
        if m.routing:  # expert parallelism: how far tokens travelled
            suffix += (
                f" | EP ranks/token {m.routing['ep_ranks_per_token_mean']:.2f}"
                f" (max {m.routing['ep_ranks_per_token_max']:.0f}),"
                f" nodes {m.routing['ep_nodes_per_token_mean']:.2f} (max {m.routing['ep_nodes_per_token_max']:.0f}),"
                f" busiest rank {m.routing['ep_recv_max_over_mean']:.2f}x mean rows"
            )
        return self.record(m.base, evaluation, extra=pipeline, progress_suffix=suffix)

    def _write_trace(self, records) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            trace = os.path.join(tmp, "timeline.json")
            write_chrome_trace(records, trace)
            self.storage.upload(trace, "timeline.json")
        self.timeline_trace = self.storage.url("timeline.json")

    def _draw_timeline(self) -> None:
        """timeline.png of the last gathered step, also logged to the tracker at that step."""
        if self._undrawn is None:
            return
        records, step = self._undrawn
        compute = [r for r in records if r.kind in COMPUTE_KINDS]
        with tempfile.TemporaryDirectory() as tmp:
            png = os.path.join(tmp, "timeline.png")
            par = self.cfg.parallel
            title = f"{par.schedule} pp={par.pp} dp={par.dp}, step {step} (measured)"
            plot_timeline(compute, png, title=title, time_unit="s")
            self.tracker.log_image(step, "timeline", png)
            self.storage.upload(png, "timeline.png")
        self.timeline_png = self.storage.url("timeline.png")
        self._undrawn, self._drawn_at = None, time.monotonic()

    def pipeline_summary(self) -> dict[str, Any]:
        """The layout, the timeline files and the measured pipeline figures for summary.json."""
        par = self.cfg.parallel
        fields: dict[str, Any] = {
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
                grad_norm=self.last_grad_norm,
            )
            if "mfu" in self.history[-1]:  # only with a known peak (resources.peak_tflops_per_worker)
                fields["mfu"] = self.history[-1]["mfu"]
        return fields

    def finish(self, extra: Mapping[str, Any] | None = None, suffix: str = "") -> dict[str, Any]:
        self._draw_timeline()
        fields = {**self.pipeline_summary(), **(extra or {})}
        if "bubble_fraction" in fields:
            suffix += f" | bubble {fields['bubble_fraction']:.0%}"
        return super().finish(fields, suffix=suffix + f" | timeline {self.timeline_png}")

    def fail(
        self, err: BaseException, extra: Mapping[str, Any] | None = None, interrupted: bool = False
    ) -> dict[str, Any]:
        try:  # the failure record comes first: a timeline that cannot be drawn must not hide it
            self._draw_timeline()
        except Exception as draw_err:  # noqa: BLE001 -- reported, then the failure is recorded
            self.log(f"timeline.png not drawn: {type(draw_err).__name__}: {draw_err}")
        return super().fail(err, {**self.pipeline_summary(), **(extra or {})}, interrupted)
