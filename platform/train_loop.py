"""The single-process reference training loop (`parallel.schedule=single`).

It is the numerical reference for the pipeline runtime: the global batch of each step is split into
`parallel.microbatches` equal micro-batches, in order, each micro-batch's loss is scaled by 1/M and
back-propagated, then one optimizer step runs. A pipeline run with the same seed, config and
micro-batch count computes the same gradients, so the two can be compared loss for loss.

One optimizer step (`train_step`), torchtitan style:
    forward_backward   M micro-batches, gradients accumulate (LM + MTP loss; the sequence-wise
                       balance loss rides along inside the MoE layers' autograd graph, its alpha
                       scaled by 1/M like the other losses: moe_balance.set_balance_loss_scale)
    clip               global grad norm, then scale (platform.optim)
    optimizer_step     LR from lr_at(step), AdamW step, zero grads
    balance            router-bias update from the step's expert loads (platform.moe_balance)
Determinism: the RNG is seeded before the model is built and data order is a pure function of
(data.seed, step), so two runs with the same config produce identical losses.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Protocol

import torch
from moeforge.model.config import ConfigError
from moeforge.model.transformer import build_model
from moeforge.platform.config.train import TrainConfig
from moeforge.platform.lr_schedule import lr_at, set_lr
from moeforge.platform.metrics import StepMetrics, TrainSummary, format_progress
from moeforge.platform.moe_balance import (
    collect_load_counts,
    load_imbalance,
    set_balance_loss_scale,
    update_balance,
)
from moeforge.platform.optim import build_optimizer, clip_grads_with_norm_, global_grad_norm
from moeforge.platform.run_outputs import RunOutputs


class BatchSourceLike(Protocol):
    """What the loop needs from its data (platform.data.BatchSource, or a test's own source)."""

    has_val: bool  # whether val_batch can be called (evaluation is skipped otherwise)

    def batch(self, step: int) -> torch.Tensor:
        """Token windows for optimizer step `step`: LongTensor [global_batch, seq_len + 1]."""

    def val_batch(self, i: int) -> torch.Tensor:
        """The i-th held-out batch, same shape."""


def split_microbatches(batch: torch.Tensor, microbatches: int) -> list[torch.Tensor]:
    """Split [global_batch, seq_len + 1] into `microbatches` equal row blocks, in order.

    The pipeline runtime feeds micro-batch i of the same step with exactly these rows."""
    rows = batch.shape[0]
    if rows % microbatches:
        raise ValueError(f"batch of {rows} sequences does not split into {microbatches} micro-batches")
    return list(batch.split(rows // microbatches, dim=0))


def inputs_and_labels(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of seq_len + 1 tokens -> (input_ids, labels), each [b, seq_len], labels shifted by one."""
    return tokens[:, :-1], tokens[:, 1:]


def seed_everything(seed: int) -> None:
    """Seed torch's global RNG (model init, anything stochastic in the loop)."""
    torch.manual_seed(seed)


def default_batch_source(cfg: TrainConfig) -> BatchSourceLike:
    """The data engineer's BatchSource for this config (imported late: the data stack is optional
    for callers that inject their own source)."""
    from moeforge.platform.data.batches import BatchSource

    return BatchSource(cfg.data, cfg.model.vocab_size, cfg.model.seq_len)


class ReferenceTrainer:
    """One process, one model, the whole global batch per step.

    `source` defaults to the configured data (platform.data.BatchSource); tests inject small
    sources. `log` receives each console line (print by default)."""

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
        if cfg.precision.name != "fp32":
            raise ConfigError(
                f"precision.name: the reference loop runs fp32 only for now, got {cfg.precision.name!r}"
            )
        self.cfg = cfg
        self.log = log
        # Inputs that can be wrong (data path, run.dir) are opened before the model is built.
        self.source = source if source is not None else default_batch_source(cfg)
        self.outputs = RunOutputs(cfg.run.dir)
        self.outputs.write_config(dataclasses.asdict(cfg))

        seed_everything(cfg.run.seed)
        self.model = build_model(cfg.model, seed=cfg.run.seed)
        self.model.train()
        self.moe_modules = list(self.model.moe_layers())
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model.named_parameters(), cfg.optim)

        self.microbatches = cfg.parallel.microbatches
        set_balance_loss_scale(self.moe_modules, cfg.model.seq_aux_loss_alpha, 1.0 / self.microbatches)
        self.step = 0  # optimizer steps taken
        self.tokens_per_step = cfg.data.global_batch * cfg.model.seq_len

    # ------------------------------------------------------------------------------------------
    def forward_backward(self, batch: torch.Tensor) -> dict[str, float]:
        """Accumulate gradients over the step's micro-batches; return the step's mean losses."""
        expected = (self.cfg.data.global_batch, self.cfg.model.seq_len + 1)
        if tuple(batch.shape) != expected:
            raise ValueError(
                f"batch shape {tuple(batch.shape)} != [data.global_batch, seq_len + 1] = {list(expected)}"
            )
        scale = 1.0 / self.microbatches
        sums = {"loss": 0.0, "lm_loss": 0.0, "mtp_loss": 0.0, "aux_loss": 0.0}
        for tokens in split_microbatches(batch, self.microbatches):
            input_ids, labels = inputs_and_labels(tokens)
            out = self.model(input_ids, labels=labels)
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

    def balance(self) -> float:
        """Router-bias update from this step's expert loads; return the step's load imbalance."""
        counts = collect_load_counts(self.moe_modules)  # [moe_layers, experts]
        update_balance(self.moe_modules, self.cfg.model.bias_update_speed, counts)
        return load_imbalance(counts)

    def train_step(self, batch: torch.Tensor) -> StepMetrics:
        """One optimizer step on one global batch."""
        start = time.perf_counter()
        losses = self.forward_backward(batch)
        grad_norm = self.clip()
        lr = self.optimizer_step()
        imbalance = self.balance()
        self.step += 1
        return StepMetrics(
            step=self.step,
            lr=lr,
            grad_norm=grad_norm,
            tokens=batch.shape[0] * (batch.shape[1] - 1),
            step_time_s=time.perf_counter() - start,
            load_imbalance=imbalance,
            **losses,
        )

    @torch.no_grad()
    def evaluate(self, num_batches: int | None = None) -> float | None:
        """Mean loss over the first `num_batches` held-out batches (None when the source has none).

        Expert loads counted during evaluation are discarded so they never move the router biases."""
        if not getattr(self.source, "has_val", False):
            return None
        num_batches = num_batches or self.cfg.run.eval_batches
        self.model.eval()
        total = 0.0
        try:
            for i in range(num_batches):
                input_ids, labels = inputs_and_labels(self.source.val_batch(i))
                total += float(self.model(input_ids, labels=labels).loss)
        finally:
            for m in self.moe_modules:
                m.reset_load()
            self.model.train()
        return total / num_batches

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs: weights and router biases (model buffers), AdamW moments,
        the step count. Data needs no state: the batch at a step is a pure function of (seed, step)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`; the next `train()` continues at the saved step."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        for m in self.moe_modules:
            m.reset_load()

    def train(self) -> TrainSummary:
        """Run cfg.run.steps optimizer steps; log, record metrics, evaluate; return the summary."""
        run = self.cfg.run
        n_params = sum(p.numel() for p in self.params)
        self.log(
            f"moeforge reference loop: {n_params / 1e6:.2f}M params, {run.steps} steps x "
            f"{self.cfg.data.global_batch} seq x {self.cfg.model.seq_len} tok, "
            f"{self.microbatches} micro-batch(es), run.dir={run.dir}"
        )
        losses: list[float] = []
        eval_loss = None
        start = time.perf_counter()
        window_time, window_tokens = 0.0, 0  # training time (data + step) since the last progress line
        while self.step < run.steps:
            t0 = time.perf_counter()
            metrics = self.train_step(self.source.batch(self.step))
            window_time += time.perf_counter() - t0
            window_tokens += metrics.tokens
            if not math.isfinite(metrics.loss):
                raise FloatingPointError(f"loss is {metrics.loss} at step {metrics.step}")
            losses.append(metrics.loss)
            record = metrics.to_dict()
            if self.step % run.log_every == 0 or self.step == run.steps:
                eta = (run.steps - self.step) * (time.perf_counter() - start) / self.step
                self.log(format_progress(metrics, run.steps, window_tokens / max(window_time, 1e-9), eta))
                window_time, window_tokens = 0.0, 0
                self.outputs.flush()
            if run.eval_every and (self.step % run.eval_every == 0 or self.step == run.steps):
                eval_loss = self.evaluate()
                if eval_loss is not None:
                    record["eval_loss"] = eval_loss
                    self.log(f"eval at step {self.step}: loss {eval_loss:.4f}")
            self.outputs.append_metrics(record)
        elapsed = time.perf_counter() - start
        summary = TrainSummary(
            steps=self.step,
            first_loss=losses[0],
            final_loss=losses[-1],
            tokens_per_s=self.step * self.tokens_per_step / max(elapsed, 1e-9),
            elapsed_s=elapsed,
            eval_loss=eval_loss,
            losses=losses,
        )
        self.outputs.write_summary(summary.to_dict())
        self.log(summary.format())
        return summary
