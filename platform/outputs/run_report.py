"""The record of a training run, kept by the process that reports it: the same for every loop.

The one-process run and rank 0 of a pipeline run both keep their run's record here, so they write
the same files, print the same lines and end a failed run the same way:

    start    config.yaml (secrets redacted); metrics.jsonl kept up to the step the run starts from
             (a resumed run continues it); the tracker (W&B or none); a header line
    record   one step: a metrics line, the progress line when the cadence says so (metrics flushed
             with it), the evaluation line, the tracker's scalars
    finish   summary.json and loss.png, the tracker's summary, the closing line
    fail     the same with status "failed" and the error; never raises over the run's own error

A pipeline run adds its timeline and bubble figures (`platform.outputs.pipeline_report.PipelineReport`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

from moeforge.platform.config.train import TrainConfig
from moeforge.platform.outputs.metrics import EvalResult, StepMetrics, TrainSummary
from moeforge.platform.outputs.run_files import RunOutputs
from moeforge.platform.outputs.tracking import ConsoleProgress, make_tracker


class RunReport:
    """One run's record (see the module docstring).

    `start_step`: the step the run starts from (the resumed checkpoint's, or 0); `resumed_from`:
    that checkpoint's path. `flops_per_token` and `peak_flops` (all devices together) give MFU
    when both are known. `outputs` may be passed when the loop opened run.dir earlier."""

    def __init__(
        self,
        cfg: TrainConfig,
        header: str,
        log: Callable[[str], None] = print,
        start_step: int = 0,
        resumed_from: str | None = None,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        outputs: RunOutputs | None = None,
    ) -> None:
        self.cfg, self.log = cfg, log
        self.outputs = outputs if outputs is not None else RunOutputs(cfg.run.dir, fresh=False)
        kept = self.outputs.start_metrics(start_step)  # the lines the resumed checkpoint covers
        self.outputs.write_config(dataclasses.asdict(cfg))
        self.tracker = make_tracker(cfg.tracking, dataclasses.asdict(cfg), rank=0)
        self.progress = ConsoleProgress(
            cfg.run.steps, cfg.run.log_every, log, flops_per_token, peak_flops, start_step=start_step
        )
        self.losses: list[float] = [r["loss"] for r in kept]  # the whole run's, resumed part included
        self.lm_losses: list[float] = [r.get("lm_loss", r["loss"]) for r in kept]
        self.skipped_steps = sum(bool(r.get("skipped")) for r in kept)
        self.rollbacks: list[dict] = []
        last_eval = next((r for r in reversed(kept) if r.get("eval_loss") is not None), {})
        self.eval_loss: float | None = last_eval.get("eval_loss")
        self.eval_ppl: float | None = last_eval.get("eval_ppl")
        self.start_step = self.step = start_step
        self.resumed_from_step = start_step if resumed_from else None
        self.last_checkpoint: str | None = resumed_from
        self.tokens_per_step = cfg.data.global_batch * cfg.model.seq_len
        self.start = time.perf_counter()
        from moeforge.platform.checkpoint.init_from import init_record

        self.init = init_record(cfg.init)  # where the weights came from, when not random
        log(header)
        if resumed_from:
            log(f"resumed from {resumed_from} at step {start_step}")
        elif self.init is not None:
            log(f"weights from {cfg.init.from_}")

    # ---- during the run --------------------------------------------------------------------------
    def record(
        self,
        metrics: StepMetrics,
        evaluation: EvalResult | None = None,
        extra: Mapping[str, Any] | None = None,
        progress_suffix: str = "",
    ) -> dict[str, Any]:
        """Record one completed step (and its evaluation); return its scalar metrics."""
        record = metrics.to_dict()
        record.update(extra or {})
        if evaluation is not None:
            record.update(evaluation.to_record())
            self.eval_loss, self.eval_ppl = evaluation.lm_loss, evaluation.ppl
        self.losses.append(metrics.loss)
        self.lm_losses.append(metrics.lm_loss)
        self.skipped_steps += metrics.skipped
        self.step = metrics.step
        self.outputs.append_metrics(record)
        if self.progress.update(metrics, suffix=progress_suffix) is not None:
            self.outputs.flush()
        if evaluation is not None:
            self.log(evaluation.format(metrics.step))
        scalars = {k: v for k, v in record.items() if not isinstance(v, (list, dict))}
        self.tracker.log(metrics.step, scalars)
        return scalars

    def record_step(self, metrics: StepMetrics, evaluation: EvalResult | None = None) -> dict[str, Any]:
        """Record one step of the step engine's metrics (a pipeline report adds its own figures)."""
        return self.record(metrics, evaluation)

    def flush(self) -> None:
        """Make every recorded line visible under run.dir (before a checkpoint: a run resumed from
        it finds every record it covers)."""
        self.outputs.flush()

    def rewind(self, rollback) -> None:
        """A loss-spike rollback (`platform.optim.bad_steps.Rollback`) to the checkpoint of
        `rollback.to_step`: the records past it are dropped (the steps are recomputed on later data),
        the rollback is kept for summary.json."""
        self.outputs.flush()
        kept = self.outputs.start_metrics(rollback.to_step)
        self.losses = [r["loss"] for r in kept]
        self.lm_losses = [r.get("lm_loss", r["loss"]) for r in kept]
        self.skipped_steps = sum(bool(r.get("skipped")) for r in kept)
        self.step = rollback.to_step
        self.rollbacks.append(rollback.to_dict())
        self.log(
            f"loss spike at step {rollback.step}: {rollback.loss:.4f} > {self.cfg.run.spike_factor} x median "
            f"{rollback.median:.4f}; rolled back to step {rollback.to_step}, skipping the batches of steps "
            f"{rollback.to_step + 1}-{rollback.step}"
        )

    def checkpointed(self, step: int, path: str) -> None:
        self.last_checkpoint = path
        self.log(f"checkpoint at step {step}: {path}")

    # ---- the end ---------------------------------------------------------------------------------
    def summary(self, **status: Any) -> TrainSummary:
        elapsed = time.perf_counter() - self.start
        return TrainSummary(
            steps=self.step,
            first_loss=self.losses[0] if self.losses else None,
            final_loss=self.losses[-1] if self.losses else None,
            first_lm_loss=self.lm_losses[0] if self.lm_losses else None,
            final_lm_loss=self.lm_losses[-1] if self.lm_losses else None,
            tokens_per_s=(self.step - self.start_step) * self.tokens_per_step / max(elapsed, 1e-9),
            elapsed_s=elapsed,
            eval_loss=self.eval_loss,
            eval_ppl=self.eval_ppl,
            losses=list(self.losses),
            resumed_from_step=self.resumed_from_step,
            checkpoint=self.last_checkpoint,
            skipped_steps=self.skipped_steps,
            rollbacks=list(self.rollbacks),
            **status,
        )

    def finish(self, extra: Mapping[str, Any] | None = None, suffix: str = "") -> dict[str, Any]:
        """summary.json (with `extra` fields) and loss.png, the tracker's summary, the closing line."""
        result = self.summary()
        summary = result.to_dict()
        summary.update(self._init_fields(), **(extra or {}))
        self.outputs.write_summary(summary)
        self.tracker.finish({k: v for k, v in summary.items() if k != "losses"})
        self.progress.finish(result, suffix=suffix)
        return summary

    def _init_fields(self) -> dict[str, Any]:
        return {} if self.init is None else {"init": self.init}

    def fail(
        self, err: BaseException, extra: Mapping[str, Any] | None = None, interrupted: bool = False
    ) -> dict[str, Any]:
        """Record a failed run (status "failed", or "interrupted" for Ctrl-C and SIGTERM): metrics so
        far, summary.json with the status and `err`, loss.png, the tracker's summary, the closing
        line. Each part is tried even if an earlier one fails, and none raises: the caller re-raises
        `err`."""
        status = "interrupted" if interrupted else "failed"
        result = self.summary(status=status, error=f"{type(err).__name__}: {err}")
        summary = result.to_dict()
        summary.update(self._init_fields(), **(extra or {}))
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
        return summary
