"""The one training loop: everything around the optimizer steps, for one process and for a pipeline.

`Trainer(cfg, engine)` owns the outer loop; a step engine owns the model and its optimizer step.
Two engines implement the same small interface (`StepEngine` below):

    SingleProcessEngine   one process, the whole model and global batch (`parallel.schedule=single`),
                          the numerical reference every parallel layout is tested against
    RankEngine            one pipeline rank: its stages, the executor, ZeRO, expert parallelism

The loop, the same for both (`train`):
    resume      at construction, from the newest complete checkpoint when checkpoint.resume is set (or
                after a restart); any layout wrote it (`platform.checkpoint.reshard.CheckpointReader`)
    warm-up     Triton kernels compiled and tuned on the step's shapes before step 1
    step        `engine.train_step`; evaluation when the cadence says; the step recorded
                (`platform.outputs.run_report.RunReport.record_step`); Ray Train's `report` at log steps
    bad steps   non-finite steps are skipped inside the engine; a loss spike rolls back to the newest
                checkpoint and skips the data window up to it (`platform.optim.bad_steps.BadStepPolicy`)
    checkpoint  when the cadence says; with checkpoint.async written in the background and reported
                once complete
    signals     SIGTERM, or a STOP file in run.dir (what the Ray driver writes on Ctrl-C), becomes
                `Terminated` at the next step boundary, where the ranks of a pipeline agree, so
                every rank stops after the same step
    failure     the completed step's record is kept, a checkpoint of the last completed step is
                written when the state is consistent (the engine says when it is), summary.json
                records status "failed" ("interrupted" for Ctrl-C and SIGTERM) with the error, and
                the error is re-raised

Collective choices (which checkpoint to resume or roll back to, whether any rank was asked to stop)
go through the engine's `agree_on` and `any_rank`, so on a pipeline every rank takes the same branch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

from moeforge.platform.checkpoint.async_writer import AsyncCheckpointWriter
from moeforge.platform.checkpoint.resume import config_changes, lr_horizon_note, resume_point
from moeforge.platform.checkpoint.store import CheckpointMeta, checkpoint_path, config_hash, list_checkpoints
from moeforge.platform.config.cadence import Cadence
from moeforge.platform.config.train import TrainConfig
from moeforge.platform.optim.bad_steps import BadStepPolicy
from moeforge.platform.outputs.metrics import EvalResult, TrainSummary
from moeforge.platform.outputs.run_files import STOP, RunOutputs
from moeforge.platform.outputs.run_report import RunReport
from moeforge.platform.outputs.storage import Storage, open_storage
from moeforge.platform.train.faults import FaultInjection
from moeforge.platform.train.signals import on_stop_signals


def interruption_note(why: str, step: int, saved_step: int | None, run_dir: str) -> str:
    """The one line a stopped run ends with, in every layout: why, after which step, how to go on."""
    if saved_step is None:
        return f"interrupted ({why}) after step {step}; no checkpoint to resume from"
    return (
        f"interrupted ({why}) after step {step}; run the same command to resume from the checkpoint "
        f"of step {saved_step} in {run_dir}"
    )


CTRL_C = "Ctrl-C"  # why a run stopped, as the closing line says it
# Said at once on the first Ctrl-C, as a Ray driver says it (`platform.launch.ray_train.stop_file_on_signal`)
STOPPING_LINE = b"moeforge: Ctrl-C: stopping after the step in progress, with a checkpoint (again to stop at once, without one)\n"


class Terminated(BaseException):
    """A stop was asked during training (Ctrl-C, SIGTERM from a preemption, `kill` or a scheduler,
    a STOP file): the run stops at the next step boundary, records that it was interrupted and keeps
    a consistent checkpoint before it exits. Its message says why ("Ctrl-C", "received SIGTERM")."""


class StepEngine(Protocol):
    """What the Trainer asks of a step engine. `step` counts optimizer steps taken; step s trains on
    global batch s + `data_skip` (batches skipped by rollbacks). `reports`: this process keeps the
    run's record (the one process, or pipeline rank 0); `distributed`: its choices are collective."""

    cfg: TrainConfig
    step: int
    data_skip: int
    reports: bool
    distributed: bool
    writer: AsyncCheckpointWriter | None  # checkpoint.async's background writer
    init_weights: bool  # whether it read init.from (not when about to resume a checkpoint)

    def open_report(
        self, log: Callable[[str], None], resumed_from: str | None, outputs: RunOutputs | None
    ) -> RunReport: ...
    def agree_on(self, pick: Callable[[], int | None]) -> int | None: ...
    def any_rank(self, flag: bool) -> bool: ...
    def load(self, path: str, storage: Storage) -> tuple[CheckpointMeta, bool]: ...
    def warm_up(self) -> str | None: ...
    def train_step(self, timeline: bool = False) -> Any: ...
    def evaluate(self) -> EvalResult | None: ...
    def save_checkpoint(self, wait: bool = False) -> str: ...
    def completed_checkpoints(self, wait: bool = False) -> list[tuple[int, str]]: ...
    def failure_checkpoint_blocker(self, agreed_stop: bool) -> str | None: ...
    def finish(self) -> None: ...


class _NotLooked:
    """`Trainer(found=...)`'s default: the Trainer looks in run.dir for a checkpoint itself."""


class Trainer:
    """The outer loop over a step engine (see the module docstring). `report_to`: Ray Train's report,
    called on every rank at each log step with rank 0's record (other ranks pass {}). `restarted`: a
    restarted worker group resumes its own newest checkpoint whatever checkpoint.resume says.
    `outputs`: run.dir, when the caller opened it before building the engine. `found`: the step of
    the checkpoint this process found to resume (None: none), when the caller looked already (to
    decide whether to read init.from); rank 0's is taken by every rank."""

    def __init__(
        self,
        cfg: TrainConfig,
        engine: StepEngine,
        log: Callable[[str], None] = print,
        report_to: Callable[[dict], None] | None = None,
        restarted: bool = False,
        outputs: RunOutputs | None = None,
        found: int | None | type[_NotLooked] = _NotLooked,
    ) -> None:
        self.cfg, self.engine, self.log, self.report_to = cfg, engine, log, report_to
        self._said_no_eval = False
        self.outputs = outputs
        self.storage = outputs.storage if outputs is not None else open_storage(cfg.run.dir)
        self.cadence = Cadence.of(cfg)
        self.bad_steps = BadStepPolicy(cfg.run)  # every rank sees the same global loss: all decide alike
        self.report: RunReport | None = None  # the run's record, while `train` runs (reporting process)
        self.summary_record: dict[str, Any] | None = None  # summary.json as written, once finished
        self.resumed_from: str | None = None
        self.saved_step: int | None = None  # the newest complete checkpoint of this run
        self._pending: tuple[Any, EvalResult | None] | None = None  # a step not yet recorded
        self._terminate: str | None = None  # why a stop was asked (a signal, a STOP file)
        self._stop_checked_at = 0.0  # when this process last looked for run.dir/STOP
        self._agreed_stop = False  # every rank stopped at the same step boundary
        looked = found

        def pick() -> int | None:  # rank 0's answer is every rank's
            if looked is _NotLooked:
                return resume_point(cfg, self.storage, restarted=restarted)
            return looked

        found = engine.agree_on(pick)
        if engine.any_rank(not engine.init_weights and found is None):
            raise RuntimeError(
                f"a rank found a checkpoint in {cfg.run.dir} to resume, so it skipped init.from, but rank 0 "
                "found none: run.dir changed while the run started"
            )
        if found is not None:
            self._restore(checkpoint_path(cfg.run.dir, found))
            self.resumed_from = checkpoint_path(cfg.run.dir, found)

    stop_check_s = 5.0  # how often the reporting process looks for run.dir/STOP (on S3, a request)

    @classmethod
    def single(cls, cfg: TrainConfig, source=None, log: Callable[[str], None] = print) -> Trainer:
        """The one-process run (`parallel.schedule=single`). Inputs that can be wrong (the data, run.dir
        and its checkpoints) are checked before the model is built."""
        from moeforge.platform.data.microbatches import default_batch_source
        from moeforge.platform.train.single import SingleProcessEngine, check_single

        check_single(cfg)
        source = source if source is not None else default_batch_source(cfg)
        outputs = RunOutputs(cfg.run.dir, fresh=False)  # metrics kept or dropped once resumed
        # a fresh run into a run.dir with checkpoints fails here; a resuming one skips init.from
        found = resume_point(cfg, outputs.storage)
        engine = SingleProcessEngine(
            cfg, source, log, outputs.storage, init_weights=found is None, faults=FaultInjection.from_config(cfg)
        )
        return cls(cfg, engine, log, outputs=outputs, found=found)

    @classmethod
    def pipeline_rank(
        cls,
        cfg: TrainConfig,
        rank: int,
        world_size: int,
        *,
        log: Callable[[str], None] = print,
        report_to: Callable[[dict], None] | None = None,
        restarted: bool = False,
        source=None,
        device="cpu",
    ) -> Trainer:
        """One rank of a pipeline run (what each Ray Train worker runs), after torch.distributed is
        initialised: its RankEngine, resumed where the run resumes. Every rank must construct it."""
        from moeforge.platform.engine.comm_record import record_comm_from_env
        from moeforge.platform.engine.rank_engine import RankEngine

        record_comm_from_env()
        # Every rank looks for the checkpoint it will resume (rank 0's choice is then taken by all):
        # init.from's weights, read only to be replaced, are skipped.
        found = resume_point(cfg, open_storage(cfg.run.dir), restarted=restarted)
        engine = RankEngine(
            cfg, rank, world_size, source=source, device=device, log=log, init_weights=found is None,
            faults=FaultInjection.from_config(cfg),
        )
        return cls(cfg, engine, log, report_to=report_to, restarted=restarted, found=found)

    @property
    def step(self) -> int:
        """Optimizer steps taken so far (the resumed checkpoint's step right after construction)."""
        return self.engine.step

    # --- checkpoints --------------------------------------------------------------------------
    def _restore(self, path: str) -> None:
        meta, same_layout = self.engine.load(path, self.storage)
        if not self.engine.reports:
            return
        if not same_layout:
            world = " ".join(f"{k}={v}" for k, v in sorted(meta.world.items()))
            self.log(
                f"resharded: {path} was written by {meta.extra.get('schedule', 'single')} {world}; "
                "weights and optimizer restored by name, RNG streams start from run.seed"
            )
        if meta.config_hash in (None, config_hash(dataclasses.asdict(self.cfg))):
            return
        saved = meta.extra.get("config")
        if saved is None:  # written before checkpoints recorded their config
            self.log("note: the config differs from the one that wrote this checkpoint")
            return
        changes = config_changes(saved, self.cfg)
        if not changes:  # the same values, written differently (a tuple read back as a list)
            return
        shown = ", ".join(changes[:8]) + (f" and {len(changes) - 8} more" if len(changes) > 8 else "")
        self.log(f"note: the config differs from the one that wrote this checkpoint: {shown}")
        horizon = lr_horizon_note(saved, self.cfg, meta.lr_step)
        if horizon is not None:
            self.log(horizon)

    def _checkpoint(self) -> None:
        if self.report is not None:
            self.report.flush()  # a run resumed from it finds every record its checkpoint covers
        path = self.engine.save_checkpoint()
        if self.engine.writer is None:  # written at once: complete now
            self._checkpointed(self.engine.step, path)

    def _checkpointed(self, step: int, path: str) -> None:
        # Only a complete checkpoint counts as saved: one still in flight may fail, and then a
        # failure must still save the step.
        self.saved_step = step
        if self.report is not None:
            self.report.checkpointed(step, path)

    def _drain(self, wait: bool = False) -> None:
        """Report the background checkpoints completed so far (all of them with `wait`); a
        background failure raises here under checkpoint.async_failure=fail."""
        for step, path in self.engine.completed_checkpoints(wait=wait):
            self._checkpointed(step, path)

    def _roll_back_to_newest(self, spike_step: int) -> int | None:
        """Rollback's part of the loop (BadStepPolicy.roll_back): reload the newest complete
        checkpoint and skip the batches from it to the spike. Returns its step, or None when there is
        none (nothing is changed)."""
        self._drain(wait=True)  # the newest checkpoint may still be in flight
        to_step = self.engine.agree_on(
            lambda: (found[-1][0] if (found := list_checkpoints(self.cfg.run.dir, self.storage)) else None)
        )
        if to_step is None:
            return None
        skip = self.engine.data_skip + (spike_step - to_step)
        self._restore(checkpoint_path(self.cfg.run.dir, to_step))
        self.engine.data_skip = skip  # the batches of steps to_step+1..spike_step are never trained on
        return to_step

    def interruption_note(self, err: BaseException) -> str:
        """One line for a run stopped by Ctrl-C or SIGTERM: where it stopped and how to go on."""
        why = CTRL_C if isinstance(err, KeyboardInterrupt) else str(err) or "SIGTERM"
        return interruption_note(why, self.engine.step, self.saved_step, self.cfg.run.dir)

    # --- the run ------------------------------------------------------------------------------
    def train(self) -> TrainSummary | None:
        """Train up to run.steps; return the summary on the reporting process (None elsewhere).
        On an exception: record what completed, save what is consistent, record the failure,
        re-raise."""
        engine = self.engine
        if engine.reports:
            for note in self.cfg.notes():
                self.log(f"note: {note}")
            if self.storage.exists(STOP):  # asked of an earlier run, which stopped: not of this one
                self.storage.delete(STOP)
        warmed = engine.warm_up()  # compile and tuning time, kept out of step 1's tokens/s
        if warmed is not None and engine.reports:
            self.log(warmed)
        if engine.reports:
            self.report = engine.open_report(self.log, self.resumed_from, self.outputs)
        try:
            with self._signals_stop_at_step_boundary():
                self._run_steps()
                engine.finish()
        except BaseException as err:
            self._record_failure(err)
            raise
        finally:
            report, self.report = self.report, None
        if report is None:
            return None
        self.summary_record = report.finish()
        return report.summary()

    def _run_steps(self) -> None:
        """Steps up to run.steps, each evaluated when due, recorded, and checkpointed when due."""
        engine, cadence = self.engine, self.cadence
        while engine.step < self.cfg.run.steps:
            self._drain()
            step = engine.step + 1
            metrics = engine.train_step(timeline=self.cfg.tracking.log_timeline and cadence.logs(step))
            base = metrics.base
            self._pending = (metrics, None)
            if cadence.evaluates(step):
                self._pending = (metrics, engine.evaluate())
                if self._pending[1] is None and engine.reports and not self._said_no_eval:
                    self._said_no_eval = True
                    self.log(
                        f"note: run.eval_every={self.cfg.run.eval_every} but the data's validation split "
                        f"holds no sequence of model.seq_len={self.cfg.model.seq_len} tokens: evaluation "
                        "is skipped (prepare a larger validation split, or set run.eval_every=0)"
                    )
            record = self.report.record_step(*self._pending) if self.report is not None else {}
            self._pending = None
            if self.report_to is not None and cadence.logs(step):
                self.report_to(record)
            if engine.any_rank(self._stop_asked()):  # stop now that the step is whole
                self._agreed_stop = True
                raise Terminated(self._terminate or "another rank was asked to stop")
            self.bad_steps.after_step(step, base.loss, base.skipped)
            spike, median = self.bad_steps.is_spike(base.loss)
            if spike:
                rollback = self.bad_steps.roll_back(step, base.loss, median, self._roll_back_to_newest, self.log)
                if rollback is not None:
                    if self.report is not None:
                        self.report.rewind(rollback)
                    continue
            if cadence.checkpoints(step):
                self._checkpoint()
        self._drain(wait=True)  # the last checkpoint is complete before the run is

    def _stop_asked(self) -> bool:
        """SIGTERM noted, or (on the reporting process, looked for at most every few seconds, as it
        may be an S3 request) a STOP file in run.dir."""
        if self._terminate is None and self.engine.reports:
            now = time.monotonic()
            if now - self._stop_checked_at >= self.stop_check_s:
                self._stop_checked_at = now
                if self.storage.exists(STOP):
                    why = self.storage.read_text(STOP).strip()  # the driver writes which signal it got
                    self.storage.delete(STOP)
                    self._terminate = why or f"{STOP} in run.dir"
        return self._terminate is not None

    @contextlib.contextmanager
    def _signals_stop_at_step_boundary(self):
        """Note SIGTERM and Ctrl-C (SIGINT) while the block runs; the loop raises `Terminated` at the
        next step boundary (every rank alike). A second Ctrl-C raises KeyboardInterrupt at once.
        Main thread only (Python delivers signals there); elsewhere this does nothing."""

        def handler(signum, frame):
            # Only noted here: an exception raised from a signal handler can land anywhere (inside
            # a finalizer it is printed and lost), so the loop stops at the step boundary instead.
            if signum == signal.SIGINT:
                if self._terminate == CTRL_C:  # asked twice: stop now
                    raise KeyboardInterrupt
                self._terminate = CTRL_C
                if self.engine.reports:  # os.write: a handler may interrupt a buffered print
                    os.write(2, STOPPING_LINE)
            else:
                self._terminate = f"received {signal.Signals(signum).name}"

        with on_stop_signals(handler):
            yield

    def _record_failure(self, err: BaseException) -> None:
        """Keep what can be kept after `err`: the completed step's record, a checkpoint when the
        state is consistent, then the failed run's record. Every part is tried even if an earlier one
        fails, and none of them may replace `err` (the caller re-raises it)."""
        engine, report = self.engine, self.report
        if self._pending is not None and report is not None:  # the step completed; keep its record
            (metrics, evaluation), self._pending = self._pending, None
            try:
                report.record_step(metrics, evaluation)
            except Exception as record_err:  # noqa: BLE001
                self.log(f"could not record step {metrics.base.step}'s metrics after the failure: {record_err}")
        blocker = engine.failure_checkpoint_blocker(self._agreed_stop)
        # A pipeline rank waits for its background writer only when every rank is alive to finish it.
        if engine.writer is not None and (blocker is None or not engine.distributed):
            try:  # the checkpoint in flight completes (or fails) first
                self._drain(wait=True)
            except Exception as write_err:  # noqa: BLE001 - reported, the original error wins
                self.log(f"the background checkpoint failed too: {write_err}")
                self.saved_step = None
        unsaved = engine.step > 0 and engine.step != self.saved_step
        if self.cfg.checkpoint.every and blocker is None and engine.any_rank(unsaved):
            try:
                self._checkpointed(engine.step, engine.save_checkpoint(wait=True))
            except Exception as save_err:  # noqa: BLE001 - reported, the original error wins
                self.log(f"could not write a checkpoint after the failure: {save_err}")
        elif self.cfg.checkpoint.every and unsaved and report is not None:
            self.log(f"failed after step {engine.step}: no checkpoint written ({blocker})")
        if report is not None:
            report.fail(err, interrupted=isinstance(err, (KeyboardInterrupt, Terminated)))
