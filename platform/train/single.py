"""The single-process reference training loop (`parallel.schedule=single`): a complete training run.

It is the numerical reference for the pipeline runtime: the global batch of each step is split into
`parallel.microbatches` equal micro-batches, in order, each micro-batch's loss is scaled by 1/M and
back-propagated, then one optimizer step runs. A pipeline run with the same seed, config and
micro-batch count computes the same gradients, so the two can be compared loss for loss.

One optimizer step (`train_step`), torchtitan style:
    recipe             the step's MTP loss weight and bias update speed (`recipe_at(step)`,
                       platform/optim/recipe_schedule.py, as every pipeline rank computes them)
    forward_backward   M micro-batches, gradients accumulate (LM + lambda * MTP loss; the sequence-wise
                       balance loss rides along inside the MoE layers' autograd graph, its alpha
                       scaled by 1/M like the other losses: bias_update.set_balance_loss_scale);
                       the forward runs under the precision policy's autocast context
    clip               global grad norm, then scale (platform.optim.adamw)
    optimizer_step     LR from lr_at(step), AdamW step (BF16 moments when configured), zero grads
    balance            router-bias update from the step's expert loads (platform.optim.bias_update)

Around the steps (`train`): the run's record (platform/outputs/run_report.py, shared with the
pipeline run: config.yaml, metrics.jsonl, progress lines, the tracker, summary.json), evaluation
and checkpoints (platform/checkpoint/store.py) when the cadence (platform/config/cadence.py) says.
With `checkpoint.resume` a run continues from the newest complete checkpoint in run.dir: weights
and router biases, AdamW state by parameter name, RNG states, step; the data position is the step
(batches are a pure function of (data.seed, step)), checked against the checkpoint's
samples_consumed.

Nothing is lost on failure: if a step or anything around it raises (KeyboardInterrupt included, and
SIGTERM, which `train` turns into a `Terminated` exception),
the metrics so far are flushed, summary.json records status "failed" with the error, and, when
checkpointing is on and the state is consistent, a checkpoint of the last completed step is
written. The state is consistent unless the error struck inside the update (clip, AdamW, router
bias): an error in the forward/backward leaves weights and optimizer as the previous step left
them (its RNG state is restored from a snapshot taken when the step began).

Bad steps (platform/optim/bad_steps.py): a non-finite loss or gradient norm skips the update, and
with run.spike_policy=rollback a loss spike reloads the newest checkpoint and skips the data window
up to it (`data_skip`: step s trains on batch s + data_skip). checkpoint.async writes checkpoints
on a background thread (platform/checkpoint/async_writer.py).

Determinism: the RNG is seeded before the model is built and data order is a pure function of
(data.seed, step), so two runs with the same config produce identical losses, and a run killed and
resumed produces the losses of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from moeforge.kernels.settings import set_reserved_sms
from moeforge.model.balance import ExpertLoad, worst_layer_load
from moeforge.model.config import ConfigError
from moeforge.model.transformer import build_model
from moeforge.platform.checkpoint.async_writer import AsyncCheckpointWriter
from moeforge.platform.checkpoint.reshard import ModelState
from moeforge.platform.checkpoint.resume import (
    checkpoint_commit,
    data_skip,
    restore_checkpoint,
    resume_point,
)
from moeforge.platform.checkpoint.state import (
    OptimizerState,
    RNGState,
    rng_state_to_tensors,
)
from moeforge.platform.checkpoint.store import checkpoint_path, config_hash, list_checkpoints, save_checkpoint
from moeforge.platform.config.cadence import Cadence
from moeforge.platform.config.train import TrainConfig
from moeforge.platform.data.microbatches import (
    BatchSourceLike,
    default_batch_source,
    inputs_and_labels,
    split_microbatches,
)
from moeforge.platform.optim.adamw import build_adamw, clip_grads_with_norm_, global_grad_norm
from moeforge.platform.optim.bad_steps import (
    LOSS_SPIKE_FACTOR,
    BadStepPolicy,
    injected_data_fault,
    is_finite_step,
)
from moeforge.platform.optim.bias_update import set_balance_loss_scale, update_router_biases
from moeforge.platform.optim.lr_schedule import lr_at, set_lr
from moeforge.platform.optim.recipe_schedule import recipe_after, recipe_at
from moeforge.platform.outputs.grad_dump import dump_reference_grads
from moeforge.platform.outputs.metrics import EvalResult, StepMetrics, TrainSummary
from moeforge.platform.outputs.run_files import RunOutputs
from moeforge.platform.outputs.run_report import RunReport
from moeforge.platform.precision import apply_precision, compute_context, warm_up_fp8_kernels


class Terminated(BaseException):
    """SIGTERM arrived during training (preemption, `kill`, a scheduler's stop): handled like Ctrl-C,
    so the run records its failure and keeps a consistent checkpoint before it exits."""


def training_device(cfg: TrainConfig) -> torch.device:
    """The one-process loop's device: the GPU when the run asks for one (parallel.gpus_per_worker)."""
    if cfg.parallel.gpus_per_worker > 0:
        if not torch.cuda.is_available():
            raise ConfigError("parallel.gpus_per_worker: the run asks for a GPU but torch sees none")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed torch's global RNG (model init, anything stochastic in the loop)."""
    torch.manual_seed(seed)


def flops_per_token(cfg: TrainConfig) -> float | None:
    """Training FLOPs per token (main model + MTP) for MFU, when a peak FLOP/s is configured."""
    if not cfg.parallel.peak_tflops_per_worker:
        return None
    from moeforge.platform.plan.accounting import estimate

    return estimate(cfg.model).run_flops_per_token


class ReferenceTrainer:
    """One process, one model, the whole global batch per step.

    `source` defaults to the configured data (platform.data.BatchSource); tests inject small
    sources. `log` receives each console line (print by default). Construction resumes from the
    newest complete checkpoint in run.dir when `checkpoint.resume` is set and one exists."""

    def __init__(
        self,
        cfg: TrainConfig,
        source: BatchSourceLike | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        if cfg.parallel.schedule != "single":
            raise ConfigError(
                f"parallel.schedule: the reference loop runs 'single', got {cfg.parallel.schedule!r}"
            )
        self.cfg = cfg
        self.log = log
        # Inputs that can be wrong (data path, run.dir, its checkpoints) are checked before the
        # model is built.
        self.source = source if source is not None else default_batch_source(cfg)
        self.outputs = RunOutputs(cfg.run.dir, fresh=False)  # metrics kept or dropped once resumed
        resume_path = self._checkpoint_to_resume()

        seed_everything(cfg.run.seed)
        self.device = training_device(cfg)
        model = build_model(cfg.model, seed=cfg.run.seed).to(
            self.device
        )  # init on CPU: same weights anywhere
        self.model = apply_precision(model, cfg.precision)
        set_reserved_sms(cfg.parallel.comm_sms)  # persistent FP8 GEMMs leave these SMs free
        self.model.train()
        self.device_type = self.device.type
        self.moe_modules = list(self.model.moe_layers())
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_adamw(self.model.named_parameters(), cfg.optim, cfg.precision)

        self.microbatches = cfg.parallel.microbatches
        set_balance_loss_scale(self.moe_modules, cfg.model.seq_aux_loss_alpha, 1.0 / self.microbatches)
        self.step = 0  # optimizer steps taken
        self.data_skip = 0  # global batches skipped by loss-spike rollbacks: step s reads batch s + skip
        self.bad_steps = BadStepPolicy(cfg.run)
        ck = cfg.checkpoint
        self.writer = (
            AsyncCheckpointWriter(
                cfg.run.dir, storage=self.outputs.storage, failure=ck.async_failure, log=log
            )
            if ck.async_save and ck.every
            else None
        )
        self.resumed_from: str | None = None  # the checkpoint this run continues
        self.last_checkpoint: str | None = None
        self._saved_step: int | None = None  # step of the newest complete checkpoint of this run
        # What a failure may save: "idle" and "forward_backward" leave weights and optimizer at the
        # last completed step; "update" (clip, AdamW, router bias) does not.
        self._phase = "idle"
        self._rng_at_step_start: dict[str, torch.Tensor] | None = None
        self._pending: tuple[StepMetrics, EvalResult | None] | None = None  # a step not yet recorded
        self.report: RunReport | None = None  # the run's record, while `train` runs
        self._terminate: str | None = None  # a SIGTERM held back until the current update is done
        if resume_path is not None:
            self.resume(resume_path)

    # --- checkpoints --------------------------------------------------------------------------
    def _checkpoint_to_resume(self) -> str | None:
        """The newest complete checkpoint in run.dir to resume from, or None for a fresh run (a
        fresh run into a run.dir holding checkpoints is refused: platform/checkpoint/resume.py)."""
        step = resume_point(self.cfg, self.outputs.storage)
        return None if step is None else checkpoint_path(self.cfg.run.dir, step)

    def checkpoint_state(self, rng: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """The parts a checkpoint holds: model (weights and router-bias buffers), AdamW state keyed
        by parameter name, RNG states (the live ones, or `rng` as captured earlier). Model and
        optimizer are keyed by full-model name, as every pipeline rank writes them, so this loop
        reads a pipeline run's checkpoint and a pipeline run reads this loop's
        (platform/checkpoint/reshard.py)."""
        return {
            "model": ModelState(self.model),
            "optimizer": OptimizerState(self.optimizer, self.model.named_parameters()),
            "rng": RNGState() if rng is None else dict(rng),
        }

    def resume(self, path: str) -> None:
        """Restore the checkpoint at `path`; the next step trained is the checkpoint's step + 1."""
        meta, same_layout = restore_checkpoint(
            self.cfg, path, self.checkpoint_state(), storage=self.outputs.storage
        )
        self.step = self._saved_step = meta.step
        self.data_skip = data_skip(meta)
        if not same_layout:
            world = " ".join(f"{k}={v}" for k, v in sorted(meta.world.items()))
            self.log(
                f"resharded: {path} was written by {meta.extra.get('schedule', 'single')} {world}; "
                "weights and optimizer restored by name, RNG streams start from run.seed"
            )
        self.resumed_from = self.last_checkpoint = path
        for m in self.moe_modules:
            m.reset_load()
        # "resumed from ..." is the run report's line (train); a changed config is said now.
        if meta.config_hash not in (None, config_hash(dataclasses.asdict(self.cfg))):
            self.log("note: the config differs from the one that wrote this checkpoint")

    def save_checkpoint(self, rng: Mapping[str, torch.Tensor] | None = None, *, wait: bool = False) -> str:
        """Checkpoint the state after `self.step` steps (metrics flushed first, so a resumed run
        finds every record its checkpoint covers). With checkpoint.async (and not `wait`) the state
        is snapshot now and written in the background (platform/checkpoint/async_writer.py); the
        checkpoint is reported once complete. Returns the checkpoint's path."""
        self.outputs.flush()
        run = self.cfg.run
        commit = checkpoint_commit(
            self.cfg, self.step, self.data_skip, world={"pp": 1, "dp": 1}, schedule="single"
        )
        if self.writer is not None and not wait:
            self.writer.submit(self.step, self.checkpoint_state(rng), commit=commit)
            return checkpoint_path(run.dir, self.step)
        self._drain_checkpoints(wait=True)  # at most one in flight, and in step order
        del commit["world"]
        path = save_checkpoint(
            run.dir, self.step, self.checkpoint_state(rng), storage=self.outputs.storage, **commit
        )
        self._checkpointed(self.step, path)
        return path

    def _checkpointed(self, step: int, path: str) -> None:
        # Only a complete checkpoint counts as saved: one still in flight may fail, and then a
        # failure must still save the step (_record_failure).
        self._saved_step = step
        self.last_checkpoint = path
        if self.report is not None:
            self.report.checkpointed(step, path)
        else:
            self.log(f"checkpoint at step {step}: {path}")

    def _drain_checkpoints(self, wait: bool = False) -> None:
        """Report the background checkpoints completed so far (all of them with `wait`); a
        background failure raises here under checkpoint.async_failure=fail."""
        if self.writer is None:
            return
        for step, path in self.writer.wait() if wait else self.writer.poll():
            self._checkpointed(step, path)

    # --- one step -----------------------------------------------------------------------------
    def forward_backward(self, batch: torch.Tensor, mtp_loss_weight: float | None = None) -> dict[str, float]:
        """Accumulate gradients over the step's micro-batches, MTP weighted by `mtp_loss_weight`
        (None: model.mtp_loss_weight); return the step's mean losses."""
        expected = (self.cfg.data.global_batch, self.cfg.model.seq_len + 1)
        if tuple(batch.shape) != expected:
            raise ValueError(
                f"batch shape {tuple(batch.shape)} != [data.global_batch, seq_len + 1] = {list(expected)}"
            )
        scale = 1.0 / self.microbatches
        sums = {"loss": 0.0, "lm_loss": 0.0, "mtp_loss": 0.0, "aux_loss": 0.0}
        for tokens in split_microbatches(batch, self.microbatches):
            input_ids, labels = inputs_and_labels(tokens.to(self.device))
            with compute_context(self.cfg.precision, self.device_type):
                out = self.model(input_ids, labels=labels, mtp_loss_weight=mtp_loss_weight)
            (out.loss * scale).backward()
            sums["loss"] += float(out.loss.detach()) * scale
            sums["lm_loss"] += float(out.lm_loss.detach()) * scale
            sums["mtp_loss"] += float(out.mtp_loss.detach()) * scale
            sums["aux_loss"] += self._aux_loss()  # recorded with the 1/M already in (see __init__)
        return sums

    def _aux_loss(self) -> float:
        """Mean over MoE layers of the balance loss their last forward recorded (0 without MoE)."""
        values = [
            float(m.last_aux_loss) for m in self.moe_modules if getattr(m, "last_aux_loss", None) is not None
        ]
        return sum(values) / len(values) if values else 0.0

    def clip(self) -> float:
        """Clip gradients by their global norm; return the norm before clipping."""
        norm = global_grad_norm(self.params)
        clip_grads_with_norm_(self.params, norm, self.cfg.optim.grad_clip)
        return float(norm)

    def optimizer_step(self) -> float:
        """AdamW step at this step's LR; return the LR used."""
        lr = lr_at(self.step, self.cfg.optim, self.cfg.run.steps)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def balance(self, gamma: float) -> ExpertLoad:
        """Router-bias update by `gamma` (the step's scheduled bias update speed) from this step's
        expert loads; return the worst layer's load."""
        return worst_layer_load(update_router_biases(self.moe_modules, gamma))  # [moe_layers, experts]

    def train_step(self, batch: torch.Tensor) -> StepMetrics:
        """One optimizer step on one global batch. A non-finite loss or gradient norm skips the
        update (platform/optim/bad_steps.py): the weights, moments and router biases stay those of
        the last good step, and the step is recorded as skipped."""
        start = time.perf_counter()
        if self.cfg.checkpoint.every:  # what a failure checkpoint restores if this step dies mid-way
            self._rng_at_step_start = rng_state_to_tensors()
        recipe = recipe_at(self.step, self.cfg)
        self._phase = "forward_backward"
        losses = self.forward_backward(batch, recipe.mtp_loss_weight)
        fault = injected_data_fault(self.cfg.parallel, self.step + self.data_skip)
        if fault == "nan_grad":
            self.params[0].grad.fill_(float("nan"))
        elif fault == "loss_spike":
            losses = {k: v * LOSS_SPIKE_FACTOR for k, v in losses.items()}
        self._phase = "update"
        if self.step == 0:  # writes only under MOEFORGE_DUMP_GRADS (a test and debugging aid)
            dump_reference_grads(self.cfg.run.dir, self.model)
        # clip first (a non-finite norm leaves the gradients as they are), then decide on the norm
        grad_norm = self.clip()
        skipped = not is_finite_step(losses["loss"], grad_norm)
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            for m in self.moe_modules:
                m.reset_load()  # a bad step's loads must not move the router biases either
            lr = lr_at(self.step, self.cfg.optim, self.cfg.run.steps)
            load = ExpertLoad(layer=None, max_load=0.0, mean_load=0.0)
        else:
            lr = self.optimizer_step()
            load = self.balance(recipe.bias_update_speed)
        self.step += 1
        self._phase = "idle"
        return StepMetrics(
            step=self.step,
            lr=lr,
            bias_update_speed=recipe.bias_update_speed,
            mtp_loss_weight=recipe.mtp_loss_weight,
            grad_norm=grad_norm,
            tokens=batch.shape[0] * (batch.shape[1] - 1),
            step_time_s=time.perf_counter() - start,
            load_imbalance=load.max_over_mean,
            max_expert_load=load.max_load,
            mean_expert_load=load.mean_load,
            skipped=skipped,
            **losses,
        )

    @torch.no_grad()
    def evaluate(self, num_batches: int | None = None) -> EvalResult | None:
        """LM cross-entropy and training objective over the first `num_batches` held-out batches
        (None when the source has none). Each batch is split into the step's micro-batches, as the
        pipeline evaluates it, so the two loops compare micro-batch for micro-batch. The objective
        weights MTP by the last trained step's lambda (`recipe_after`).

        Expert loads counted during evaluation are discarded so they never move the router biases."""
        if not getattr(self.source, "has_val", False):
            return None
        num_batches = num_batches or self.cfg.run.eval_batches
        mtp_loss_weight = recipe_after(self.step, self.cfg).mtp_loss_weight
        self.model.eval()
        lm_sum = objective_sum = 0.0
        count = 0
        try:
            for i in range(num_batches):
                for tokens in split_microbatches(self.source.val_batch(i), self.microbatches):
                    input_ids, labels = inputs_and_labels(tokens.to(self.device))
                    with compute_context(self.cfg.precision, self.device_type):
                        out = self.model(input_ids, labels=labels, mtp_loss_weight=mtp_loss_weight)
                    lm_sum += float(out.lm_loss)
                    objective_sum += float(out.loss)
                    count += 1
        finally:
            for m in self.moe_modules:
                m.reset_load()
            self.model.train()
        return EvalResult(lm_loss=lm_sum / count, objective=objective_sum / count)

    # --- in-memory state (tests, notebooks); files go through save_checkpoint / resume ---------
    def state_dict(self) -> dict:
        """The checkpoint parts as flat tensor dicts, plus the step count."""
        state: dict[str, Any] = {
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizer": OptimizerState(self.optimizer, self.model.named_parameters()).state_dict(),
            "rng": RNGState().state_dict(),
        }
        state["step"] = self.step
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`; the next `train()` continues at the saved step."""
        self.model.load_state_dict(state["model"], strict=True)
        OptimizerState(self.optimizer, self.model.named_parameters()).load_state_dict(state["optimizer"])
        RNGState().load_state_dict(state["rng"])
        self.step = int(state["step"])
        for m in self.moe_modules:
            m.reset_load()

    # --- the run ------------------------------------------------------------------------------
    def train(self) -> TrainSummary:
        """Train up to cfg.run.steps; log, record metrics, track, evaluate, checkpoint; return the
        summary. On an exception: record what completed, save what is consistent, record the
        failure, re-raise."""
        run = self.cfg.run
        n_params = sum(p.numel() for p in self.params)
        header = (
            f"moeforge reference loop: {n_params / 1e6:.2f}M params, {run.steps} steps x "
            f"{self.cfg.data.global_batch} seq x {self.cfg.model.seq_len} tok, "
            f"{self.microbatches} micro-batch(es), precision {self.cfg.precision.name}, run.dir={run.dir}"
        )
        tokens = self.cfg.data.global_batch // self.microbatches * self.cfg.model.seq_len
        warmed = warm_up_fp8_kernels(self.model, self.cfg.precision, tokens)
        if warmed.launches:  # compile and tuning time, kept out of step 1's tokens/s
            self.log(warmed.summary())
        peak = self.cfg.parallel.peak_tflops_per_worker * 1e12 or None
        self.report = RunReport(
            self.cfg,
            header,
            self.log,
            start_step=self.step,
            resumed_from=self.resumed_from,
            flops_per_token=flops_per_token(self.cfg),
            peak_flops=peak,
            outputs=self.outputs,
        )
        try:
            with self._sigterm_raises_terminated():
                self._run_steps()
        except BaseException as err:
            self._record_failure(err)
            raise
        finally:
            report, self.report = self.report, None
        report.finish()
        return report.summary()

    @contextlib.contextmanager
    def _sigterm_raises_terminated(self):
        """Turn SIGTERM into `Terminated` while the block runs. A signal that lands inside an update
        is held until the step is complete and recorded, so what is saved is consistent. Main
        thread only (Python delivers signals there); elsewhere this does nothing."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            self._terminate = f"received {signal.Signals(signum).name}"
            if self._phase != "update":
                raise Terminated(self._terminate)

        previous = signal.signal(signal.SIGTERM, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _run_steps(self) -> None:
        """Steps up to run.steps, each evaluated when due, recorded, and checkpointed when due."""
        cadence = Cadence.of(self.cfg)
        while self.step < self.cfg.run.steps:
            self._drain_checkpoints()
            t0 = time.perf_counter()
            metrics = self.train_step(self.source.batch(self.step + self.data_skip))
            metrics.step_time_s = time.perf_counter() - t0  # data time included
            self._pending = (metrics, None)
            if cadence.evaluates(self.step):
                self._pending = (metrics, self.evaluate())
            self.report.record(*self._pending)
            self._pending = None
            if self._terminate:  # SIGTERM during the update: stop now that the step is whole
                raise Terminated(self._terminate)
            self.bad_steps.after_step(self.step, metrics.loss, metrics.skipped)
            spike, median = self.bad_steps.is_spike(metrics.loss)
            if spike:
                rollback = self.bad_steps.roll_back(
                    metrics.step, metrics.loss, median, self._restore_newest, self.log
                )
                if rollback is not None:
                    self.report.rewind(rollback)
                    continue
            if cadence.checkpoints(self.step):
                self.save_checkpoint()
        self._drain_checkpoints(wait=True)  # the last checkpoint is complete before the run is

    def _restore_newest(self, spike_step: int) -> int | None:
        """Rollback's part of this loop (BadStepPolicy.roll_back): reload the newest complete
        checkpoint and skip the batches from it to the spike. Returns its step, or None when there is
        no checkpoint (nothing is changed)."""
        self._drain_checkpoints(wait=True)  # the newest checkpoint may still be in flight
        found = list_checkpoints(self.cfg.run.dir, self.outputs.storage)
        if not found:
            return None
        to_step, path = found[-1]
        skip = self.data_skip + (spike_step - to_step)
        self.resume(path)
        self.data_skip = skip  # the batches of steps to_step+1..spike_step are never trained on
        return to_step

    def _record_failure(self, err: BaseException) -> None:
        """Keep what can be kept after `err`: the completed step's record, a checkpoint when the
        state is consistent, then the failed run's record (RunReport.fail). Every part is tried even
        if an earlier one fails, and none of them may replace `err` (the caller re-raises it)."""
        if self._pending is not None:  # the step completed; its record must not be lost
            (metrics, evaluation), self._pending = self._pending, None
            try:
                self.report.record(metrics, evaluation)
            except Exception as record_err:  # noqa: BLE001
                self.log(f"could not record step {metrics.step}'s metrics after the failure: {record_err}")
        if self.writer is not None:  # the checkpoint in flight completes (or fails) first
            try:
                self._drain_checkpoints(wait=True)
            except Exception as write_err:  # noqa: BLE001 - reported, the original error wins
                self.log(f"the background checkpoint failed too: {write_err}")
                self._saved_step = None
        if self.cfg.checkpoint.every and self.step > 0 and self.step != self._saved_step:
            if self._phase == "update":
                self.log(
                    f"failed mid-update of step {self.step + 1}: no checkpoint written (state inconsistent)"
                )
            else:
                rng = self._rng_at_step_start if self._phase == "forward_backward" else None
                try:
                    self.save_checkpoint(rng=rng, wait=True)
                except Exception as save_err:  # noqa: BLE001 - reported, the original error wins
                    self.log(f"could not write a checkpoint after the failure: {save_err}")
        self.report.fail(err)
