"""The one-process step engine (`parallel.schedule=single`): the numerical reference.

The global batch of each step is split into `parallel.microbatches` equal micro-batches, in order,
each micro-batch's loss (the mean over its n_m trained labels) is scaled by n_m / N and
back-propagated, N the trained labels of the whole global batch, then one optimizer step runs: the
step's objective is the mean over every trained label of the batch, however it is split (for plain
text n_m / N = 1/M). A pipeline run with the same seed, config and micro-batch count computes the
same gradients, so the two compare loss for loss. The Trainer (`platform.train.trainer.Trainer`) runs the
loop around it; `Trainer.single(cfg)` builds the pair.

One optimizer step (`train_step`), torchtitan style:
    recipe             the step's MTP loss weight and bias update speed (`recipe_at(step)`, as every
                       pipeline rank computes them)
    forward_backward   M micro-batches, gradients accumulate (LM + lambda * MTP loss, weighted by
                       n_m / N; the sequence-wise balance loss rides inside the MoE layers' autograd
                       graph, its alpha scaled by 1/M: it is a mean over sequences, not labels); the
                       forward runs under the precision policy's autocast
    clip               global grad norm, then scale
    optimizer_step     LR from lr_at(step), AdamW step (BF16 moments when configured), zero grads
    balance            router-bias update from the step's expert loads

What a failure may save: an error in the forward/backward leaves weights and optimizer as the
previous step left them (the RNG is restored from a snapshot taken when the step began); an error
inside the update (clip, AdamW, router bias) leaves them inconsistent, and nothing is saved.

Determinism: the RNG is seeded before the model is built and data order is a pure function of
(data.seed, step), so two runs with the same config produce identical losses, and a run killed and
resumed produces the losses of an uninterrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from moeforge.kernels.settings import set_reserved_sms
from moeforge.model.balance import ExpertLoad, worst_layer_load
from moeforge.model.transformer import build_model
from moeforge.platform.checkpoint.async_writer import AsyncCheckpointWriter
from moeforge.platform.checkpoint.init_from import load_initial_weights
from moeforge.platform.checkpoint.reshard import ModelState
from moeforge.platform.checkpoint.resume import checkpoint_commit, data_skip, restore_checkpoint
from moeforge.platform.checkpoint.state import OptimizerState, RNGState, rng_state_to_tensors
from moeforge.platform.checkpoint.store import CheckpointMeta, checkpoint_path, save_checkpoint
from moeforge.platform.config.builder import ConfigError
from moeforge.platform.config.train import TrainConfig
from moeforge.platform.data.microbatches import (
    Batch,
    BatchSourceLike,
    MicroBatch,
    batch_tokens,
    microbatch_inputs,
)
from moeforge.platform.optim.adamw import build_adamw, clip_grads_with_norm_, global_grad_norm
from moeforge.platform.optim.bad_steps import is_finite_step
from moeforge.platform.optim.bias_update import set_balance_loss_scale, update_router_biases
from moeforge.platform.optim.lr_schedule import lr_at, set_lr
from moeforge.platform.optim.recipe_schedule import recipe_after, recipe_at
from moeforge.platform.outputs.grad_dump import dump_reference_grads
from moeforge.platform.outputs.metrics import EvalResult, StepMetrics
from moeforge.platform.outputs.run_files import RunOutputs
from moeforge.platform.outputs.run_report import RunReport
from moeforge.platform.outputs.storage import Storage
from moeforge.platform.precision import apply_precision, compute_context, warm_up_fp8_kernels
from moeforge.platform.train.faults import LOSS_SPIKE_FACTOR, FaultInjection


def check_single(cfg: TrainConfig) -> None:
    if cfg.parallel.schedule != "single":
        raise ConfigError(f"parallel.schedule: the one-process engine runs 'single', got {cfg.parallel.schedule!r}")


def training_device(cfg: TrainConfig) -> torch.device:
    """The one-process device: the GPU when the run asks for one (resources.gpus_per_worker)."""
    if cfg.resources.gpus_per_worker > 0:
        if not torch.cuda.is_available():
            raise ConfigError("resources.gpus_per_worker: the run asks for a GPU but torch sees none")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def flops_per_token(cfg: TrainConfig) -> float | None:
    """Training FLOPs per token (main model + MTP) for MFU, when a peak FLOP/s is configured."""
    if not cfg.resources.peak_tflops_per_worker:
        return None
    from moeforge.platform.plan.accounting import estimate

    return estimate(cfg.model).run_flops_per_token


class SingleProcessEngine:
    """One process, one model, the whole global batch per step (the Trainer's StepEngine).

    `source` gives the batches (platform.data.BatchSource by default; tests pass small ones);
    `storage` is run.dir's, when the caller has opened it."""

    reports = True
    distributed = False

    def __init__(
        self,
        cfg: TrainConfig,
        source: BatchSourceLike,
        log: Callable[[str], None] = print,
        storage: Storage | None = None,
        init_weights: bool = True,
        faults: FaultInjection | None = None,
    ) -> None:
        check_single(cfg)
        self.faults = faults  # test-only hooks (debug.fault_injection), built by the Trainer
        self.init_weights = init_weights  # init.from read; False when resuming (replaced at once)
        self.cfg, self.source, self.log = cfg, source, log
        torch.manual_seed(cfg.run.seed)  # model init and anything stochastic in the loop
        self.device = training_device(cfg)
        model = build_model(cfg.model, seed=cfg.run.seed)  # init on CPU: same weights anywhere
        if cfg.init.kind is not None and init_weights:  # published or earlier weights (init.from)
            load_initial_weights(cfg.model, cfg.init, model)
        self.model = apply_precision(model.to(self.device), cfg.precision)
        set_reserved_sms(cfg.parallel.comm_sms)  # persistent FP8 GEMMs leave these SMs free
        self.model.train()
        self.device_type = self.device.type
        self.moe_modules = list(self.model.moe_layers())
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_adamw(self.model.named_parameters(), cfg.optim, cfg.precision)
        self.microbatches = cfg.parallel.microbatches
        self.mtp_depths = cfg.model.num_nextn_predict_layers
        set_balance_loss_scale(self.moe_modules, cfg.model.seq_aux_loss_alpha, 1.0 / self.microbatches)
        self.step = 0  # optimizer steps taken
        self.data_skip = 0  # global batches skipped by loss-spike rollbacks: step s reads batch s + skip
        ck = cfg.checkpoint
        self.storage = storage  # run.dir's (opened from the path when None)
        self.writer = (
            AsyncCheckpointWriter(cfg.run.dir, storage=storage, failure=ck.async_failure, log=log)
            if ck.async_save and ck.every
            else None
        )
        # "idle" and "forward_backward" leave weights and optimizer at the last completed step;
        # "update" (clip, AdamW, router bias) does not.
        self._phase = "idle"
        self._rng_at_step_start: dict[str, torch.Tensor] | None = None

    # --- the Trainer's questions --------------------------------------------------------------
    def agree_on(self, pick: Callable[[], int | None]) -> int | None:
        return pick()

    def any_rank(self, flag: bool) -> bool:
        return flag

    def failure_checkpoint_blocker(self, agreed_stop: bool) -> str | None:
        if self._phase == "update":
            return f"failed mid-update of step {self.step + 1}: state inconsistent"
        return None

    def warm_up(self) -> str | None:
        tokens = self.cfg.data.global_batch // self.microbatches * self.cfg.model.seq_len
        warmed = warm_up_fp8_kernels(self.model, self.cfg.precision, tokens)
        return warmed.summary() if warmed.launches else None

    def open_report(self, log, resumed_from: str | None, outputs: RunOutputs | None) -> RunReport:
        cfg, run = self.cfg, self.cfg.run
        n_params = sum(p.numel() for p in self.params)
        header = (
            f"moeforge single process: {n_params / 1e6:.2f}M params, {run.steps} steps x "
            f"{cfg.data.global_batch} seq x {cfg.model.seq_len} tok, "
            f"{self.microbatches} micro-batch(es), precision {cfg.precision.name}, run.dir={run.dir}"
        )
        peak = cfg.resources.peak_tflops_per_worker * 1e12 or None
        return RunReport(
            cfg,
            header,
            log,
            start_step=self.step,
            resumed_from=resumed_from,
            flops_per_token=flops_per_token(cfg),
            peak_flops=peak,
            outputs=outputs,
        )

    def finish(self) -> None:
        pass

    # --- checkpoints --------------------------------------------------------------------------
    def checkpoint_state(self, rng: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """The parts a checkpoint holds: model (weights and router-bias buffers), AdamW state keyed
        by parameter name, RNG states (the live ones, or `rng` as captured earlier). Model and
        optimizer are keyed by full-model name, as every pipeline rank writes them, so either reads
        the other's checkpoints (`platform.checkpoint.reshard.CheckpointReader`)."""
        return {
            "model": ModelState(self.model),
            "optimizer": OptimizerState(self.optimizer, self.model.named_parameters()),
            "rng": RNGState() if rng is None else dict(rng),
        }

    def load(self, path: str, storage: Storage | None = None) -> tuple[CheckpointMeta, bool]:
        """Restore the checkpoint at `path`; the next step trained is the checkpoint's step + 1."""
        meta, same_layout = restore_checkpoint(self.cfg, path, self.checkpoint_state(), storage=storage)
        self.step, self.data_skip = meta.step, data_skip(meta)
        for m in self.moe_modules:
            m.reset_load()
        return meta, same_layout

    def save_checkpoint(self, wait: bool = False) -> str:
        """Checkpoint the state after `self.step` steps. With checkpoint.async (and not `wait`) the
        state is snapshot now and written in the background (reported through
        `completed_checkpoints`, which the caller drains before a `wait` save). After a failure inside
        a step's forward/backward the RNG saved is the step's start. Returns the checkpoint's path."""
        commit = checkpoint_commit(self.cfg, self.step, self.data_skip, world={"pp": 1, "dp": 1}, schedule="single")
        rng = self._rng_at_step_start if wait and self._phase == "forward_backward" else None
        if self.writer is not None and not wait:
            self.writer.submit(self.step, self.checkpoint_state(), commit=commit)
            return checkpoint_path(self.cfg.run.dir, self.step)
        del commit["world"]
        return save_checkpoint(self.cfg.run.dir, self.step, self.checkpoint_state(rng), storage=self.storage, **commit)

    def completed_checkpoints(self, wait: bool = False) -> list[tuple[int, str]]:
        """Background checkpoints completed since the last call (all in flight, with `wait`)."""
        if self.writer is None:
            return []
        return self.writer.wait() if wait else self.writer.poll()

    # --- one step -----------------------------------------------------------------------------
    def forward_backward(self, batch: Batch, mtp_loss_weight: float | None = None) -> dict[str, float]:
        """Accumulate gradients over the step's micro-batches, MTP weighted by `mtp_loss_weight`
        (None: model.mtp_loss_weight); return the step's losses.

        Micro-batch m's loss is scaled by n_m / N
        (`platform.data.microbatches.microbatch_inputs`), so the gradient and the returned loss, lm_loss
        and mtp_loss are token means over the whole batch's N trained labels. MTP is weighted the same
        way, per depth: depth k's mean inside the micro-batch's loss carries the micro-batch's share of
        the batch's depth-k targets, n_m^k / N^k (the model's `mtp_scales` give the ratio to n_m / N),
        so the MTP term is, for each depth, a mean over the batch's trained targets of that depth
        too."""
        expected = (self.cfg.data.global_batch, self.cfg.model.seq_len + 1)
        shape = tuple(batch_tokens(batch).shape)
        if shape != expected:
            raise ValueError(f"batch shape {shape} != [data.global_batch, seq_len + 1] = {list(expected)}")
        sums = {"loss": 0.0, "lm_loss": 0.0, "mtp_loss": 0.0, "aux_loss": 0.0}
        for mb in microbatch_inputs(batch, self.microbatches, mtp_depths=self.mtp_depths):
            scale = mb.loss_scale
            out = self._forward(mb.to(self.device), mtp_loss_weight)
            (out.loss * scale).backward()
            sums["loss"] += float(out.loss.detach()) * scale
            sums["lm_loss"] += float(out.lm_loss.detach()) * scale
            sums["mtp_loss"] += float(out.mtp_loss.detach()) * scale
            sums["aux_loss"] += self._aux_loss()  # recorded with the 1/M already in (see __init__)
        return sums

    def _forward(self, mb: MicroBatch, mtp_loss_weight: float | None):
        """The model's forward and losses on one micro-batch, under the precision policy."""
        with compute_context(self.cfg.precision, self.device_type):
            return self.model(
                mb.input_ids,
                labels=mb.labels,
                mtp_loss_weight=mtp_loss_weight,
                segments=mb.segments,
                mtp_scales=mb.mtp_scales,
            )

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

    def train_step(self, timeline: bool = False, batch: Batch | None = None) -> StepMetrics:
        """One optimizer step on the step's global batch (or `batch`). A non-finite loss or gradient
        norm skips the update (`platform.optim.bad_steps`): the weights, moments and router biases
        stay those of the last good step, and the step is recorded as skipped. `timeline` is the
        pipeline's; one process has none."""
        start = time.perf_counter()  # data time included
        if batch is None:
            batch = self.source.batch(self.step + self.data_skip)
        if self.cfg.checkpoint.every:  # what a failure checkpoint restores if this step dies mid-way
            self._rng_at_step_start = rng_state_to_tensors()
        recipe = recipe_at(self.step, self.cfg)
        self._phase = "forward_backward"
        losses = self.forward_backward(batch, recipe.mtp_loss_weight)
        fault = self.faults.data_fault(self.step + self.data_skip) if self.faults else None
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
            tokens=batch_tokens(batch).shape[0] * (batch_tokens(batch).shape[1] - 1),
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
        (None when the source has none): each batch's means over its trained labels, its
        micro-batches weighted as a training step weighs them, then the mean over batches. Each
        batch is split into the step's micro-batches, as the pipeline evaluates it, so the two
        loops compare micro-batch for micro-batch. The objective weights MTP by the last trained
        step's lambda (`recipe_after`).

        Expert loads counted during evaluation are discarded so they never move the router biases."""
        if not getattr(self.source, "has_val", False):
            return None
        num_batches = num_batches or self.cfg.run.eval_batches
        mtp_loss_weight = recipe_after(self.step, self.cfg).mtp_loss_weight
        self.model.eval()
        lm_sum = objective_sum = 0.0
        try:
            for i in range(num_batches):
                val = self.source.val_batch(i)
                for mb in microbatch_inputs(val, self.microbatches, mtp_depths=self.mtp_depths):
                    out = self._forward(mb.to(self.device), mtp_loss_weight)
                    lm_sum += mb.loss_scale * float(out.lm_loss)
                    objective_sum += mb.loss_scale * float(out.loss)
        finally:
            for m in self.moe_modules:
                m.reset_load()
            self.model.train()
        return EvalResult(lm_loss=lm_sum / num_batches, objective=objective_sum / num_batches)

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

