"""One pipeline rank's step engine: its optimizer step, evaluation, and the Trainer's questions.

`RankEngine(cfg, rank, world_size)` is built after torch.distributed is initialised (by Ray Train's
TorchConfig, or by a test that spawns gloo processes); what the rank holds is built by
`platform.engine.rank_build.assemble_rank`, its checkpoints written by
`platform.engine.rank_checkpoint.RankCheckpoints`, and the Trainer (`platform.train.trainer.Trainer`)
runs the loop around it. Per optimizer step (`train_step`):

    data        every rank (every stage's attention reads the segments of packed rows) reads this dp
                replica's rows of the global batch, split into M micro-batches in order (the
                one-process step's split: `data.microbatches.microbatch_inputs`); micro-batch m's
                loss is scaled by dp * n_m / N (and each MTP depth's by its own share), N the
                trained labels of the whole global batch, counted from the data on every rank alike
                (`replica_batch`), so that the dp average of the gradients is the gradient of the
                global token-mean loss
    recipe      the step's MTP loss weight and bias update speed (`recipe_at(step)`,
                `platform.optim.recipe_schedule.recipe_at`), the same on every rank
    executor    the schedule's action list for this rank (F / B / W / BW / F&B, async p2p)
    tie         with MTP on 1F1B/ZB1P: sum the embedding gradient of the first and last stage
    optimizer   ZeRO (DeepSpeed) or plain: reduce over the shard group, global-norm clip, AdamW at
                `lr_at(step)` (`platform.optim.zero_step.ZeroStep`, `platform.optim.plain_step.PlainStep`)
    balance     expert loads summed over every rank holding the layer, router-bias update
                (`platform.optim.bias_update.update_router_biases`)
    metrics     losses, grad norm, LR, tokens/s, MFU, expert load, bubble, exposed comm (all ranks
                contribute; rank 0 formats and records them)

Around the steps, for the Trainer: `evaluate` (each dp replica evaluates its rows of every held-out
batch through the same executor and stage placement, on forward-only lists), `save_checkpoint`
(every rank writes its shard; rank 0 commits with world {pp, dp, ep}), `load` (any layout wrote the
checkpoint), and the collective choices `agree_on` and `any_rank`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from moeforge.model.balance import ExpertLoad, worst_layer_load
from moeforge.platform.checkpoint.resume import data_skip
from moeforge.platform.checkpoint.store import CheckpointMeta
from moeforge.platform.config.train import TrainConfig
from moeforge.platform.data.microbatches import (
    Batch,
    MicroBatch,
    default_batch_source,
    microbatch_inputs,
    replica_batch,
)
from moeforge.platform.engine.executor import StepTrace
from moeforge.platform.engine.rank_build import assemble_rank
from moeforge.platform.engine.rank_checkpoint import RankCheckpoints
from moeforge.platform.moe.routing_stats import routing_summary
from moeforge.platform.optim.bias_update import set_balance_loss_scale, update_router_biases
from moeforge.platform.optim.lr_schedule import lr_at
from moeforge.platform.optim.recipe_schedule import RecipeValues, recipe_after, recipe_at
from moeforge.platform.outputs.grad_dump import dump_pipeline_grads
from moeforge.platform.outputs.metrics import EvalResult, StepMetrics
from moeforge.platform.outputs.pipeline_report import PipelineReport
from moeforge.platform.outputs.storage import Storage
from moeforge.platform.outputs.timeline import TimelineRecord
from moeforge.platform.plan.accounting import estimate
from moeforge.platform.precision import warm_up_fp8_kernels
from moeforge.platform.train.faults import LOSS_SPIKE_FACTOR, FaultInjection


@dataclass
class PipelineStepMetrics:
    """StepMetrics plus what only a pipeline run measures."""

    base: StepMetrics
    mfu: float | None  # None without resources.peak_tflops_per_worker (no peak: no MFU)
    bubble_fraction: float  # measured: 1 - mean compute time / step time over ranks
    exposed_comm_s: list[float]  # per world rank: time blocked on transfers
    exposed_a2a_s: list[float] = field(default_factory=list)  # per world rank: blocked on phase all-to-alls
    records: list[TimelineRecord] = field(default_factory=list)  # rank 0, when gathered
    routing: dict[str, float] = field(default_factory=dict)  # EP: ranks and nodes per token

    def pipeline_fields(self) -> dict:
        """The pipeline's own figures, as metrics.jsonl records them beside the base metrics."""
        return {
            "bubble_fraction": self.bubble_fraction,
            "exposed_comm_s": max(self.exposed_comm_s),
            "exposed_comm_s_per_rank": self.exposed_comm_s,
            "exposed_a2a_s": max(self.exposed_a2a_s, default=0.0),
            **self.routing,
            **({} if self.mfu is None else {"mfu": self.mfu}),
        }

    def to_dict(self) -> dict:
        return {**self.base.to_dict(), **self.pipeline_fields()}


class RankEngine:
    """One rank's step (the Trainer's StepEngine for a pipeline rank): its built parts (`parts`), its
    checkpoints (`checkpoints`), its data view, and where the run stands (`step`, `data_skip`)."""

    distributed = True

    def __init__(
        self,
        cfg: TrainConfig,
        rank: int,
        world_size: int,
        source=None,
        device: torch.device | str = "cpu",
        log: Callable[[str], None] = print,
        init_weights: bool = True,
        faults: FaultInjection | None = None,
    ) -> None:
        self.cfg, self.rank = cfg, rank
        self.faults = faults  # test-only hooks (debug.fault_injection), built by the Trainer
        self.init_weights = init_weights  # init.from read (assemble_rank); False when resuming
        self.device = torch.device(device)
        self.reports = rank == 0  # rank 0 keeps the run's record
        self.microbatches = cfg.parallel.microbatches
        self.parts = assemble_rank(cfg, rank, world_size, self.device, fault=self._maybe_fault if faults else None, init_weights=init_weights)
        set_balance_loss_scale(self.parts.moe, cfg.model.seq_aux_loss_alpha, 1.0 / self.microbatches)
        self.checkpoints = RankCheckpoints(cfg, self.parts, log)
        self.writer = self.checkpoints.writer
        self.source = source if source is not None else default_batch_source(cfg)
        self.flops_per_token = estimate(cfg.model).run_flops_per_token
        self.step = 0
        self.data_skip = 0  # global batches skipped by loss-spike rollbacks: step s reads batch s + skip
        self.mtp_depths = cfg.model.num_nextn_predict_layers
        # Evaluation needs held-out data on every rank (every rank reads the rows).
        has_val = 1.0 if getattr(self.source, "has_val", False) else 0.0
        self.has_val = bool(self._all_reduce_small(torch.tensor([has_val]), dist.ReduceOp.MIN)[0] > 0)

    def warm_up(self) -> str | None:
        """Every rank: compile and tune this rank's Triton kernels on the step's shapes, then a
        barrier, so that compilation never counts against a peer's p2p or collective timeout.
        Returns rank 0's log line (the slowest rank's time), or None where nothing was compiled."""
        cfg = self.cfg
        tokens = cfg.data.global_batch // (cfg.parallel.dp * self.microbatches) * cfg.model.seq_len
        fp8_dispatch = self.parts.placement is not None and cfg.precision.fp8_linear
        report = warm_up_fp8_kernels(self.parts.rank_module, cfg.precision, tokens, fp8_dispatch)
        dist.barrier()
        slowest, launches = self._all_reduce_small(
            torch.tensor([report.seconds, float(report.launches)], dtype=torch.float64), dist.ReduceOp.MAX
        ).tolist()
        if launches == 0 or self.rank != 0:
            return None
        return f"{report.summary()}; slowest rank {slowest:.1f} s"

    # ---- one optimizer step -----------------------------------------------------------------------
    def _maybe_fault(self) -> None:
        self.faults.at_step(self.rank, self.step, self.parts.name)

    def _replica_microbatches(self, read: Callable[[int, int], Batch]) -> list[MicroBatch]:
        """This replica's micro-batches of one global batch (`read(dp_rank, dp)`), each loss scaled
        by dp * n_m / N (`microbatch_inputs`, with the global batch's counts from `replica_batch`).
        Read and counted on the host, then moved to the device."""
        dp = self.cfg.parallel.dp
        batch, totals = replica_batch(read, self.parts.dp_rank, dp, self.mtp_depths)
        microbatches = microbatch_inputs(batch, self.microbatches, totals, dp, self.mtp_depths)
        return [mb.to(self.device) for mb in microbatches]

    def _microbatches(self) -> list[MicroBatch]:
        """The step's micro-batches of this replica."""
        step = self.step + self.data_skip
        return self._replica_microbatches(lambda r, n: self.source.batch(step, r, n))

    def train_step(self, timeline: bool = False) -> PipelineStepMetrics:
        start = time.perf_counter()
        recipe = recipe_at(self.step, self.cfg)
        self.parts.compute.start_step(self._microbatches(), recipe.mtp_loss_weight)
        dist.barrier()  # a common start for every rank's timeline
        trace = self.parts.executor.run()
        grads = self.parts.compute.take_grads()
        for p in self.parts.tied:  # sum the first and last stage's embedding gradients
            # No loop variable keeps the gradient alive: the optimizer step consumes `grads`.
            dist.all_reduce(grads.setdefault(id(p), torch.zeros_like(p)), group=self.parts.groups.tie)
        fault = self.faults.data_fault(self.step + self.data_skip) if self.faults else None
        if fault == "nan_grad" and grads:
            next(iter(grads.values())).fill_(float("nan"))
        if self.step == 0:  # writes only under MOEFORGE_DUMP_GRADS (a test and debugging aid)
            dump_pipeline_grads(self, grads)
        lr = lr_at(self.step, self.cfg.optim, self.cfg.run.steps)
        if self._step_is_finite(grads):
            grad_norm = self.parts.opt.step(grads, lr)
            load = self._balance(recipe.bias_update_speed)
            skipped = False
        else:  # `platform.optim.bad_steps.BadStepPolicy`: no update, on every rank alike
            grads.clear()
            for m in self.parts.moe:
                m.reset_load()
            grad_norm, load, skipped = math.nan, ExpertLoad(layer=None, max_load=0.0, mean_load=0.0), True
        self.step += 1
        metrics = self._metrics(trace, lr, recipe, grad_norm, load, start, timeline)
        metrics.base.skipped = skipped
        if fault == "loss_spike":
            for key in ("loss", "lm_loss", "mtp_loss", "aux_loss"):
                setattr(metrics.base, key, getattr(metrics.base, key) * LOSS_SPIKE_FACTOR)
        return metrics

    def _step_is_finite(self, grads: dict[int, torch.Tensor]) -> bool:
        """Every rank's losses and gradients are finite (one flag, all-reduced: every rank decides
        alike). Checked before the optimizer step, which DeepSpeed would otherwise apply in fp32/bf16
        whatever the norm; one pass over this rank's gradients on the device, and one host read of
        the all-reduced flag (the host decides whether to step)."""
        checks = [torch.isfinite(g).all().reshape(1).to(self.device) for g in grads.values()]
        checks += [torch.isfinite(v["loss"]).reshape(1).to(self.device) for v in self.parts.compute.losses.values()]
        finite = torch.cat(checks).all() if checks else torch.tensor(True, device=self.device)
        bad = (~finite).to(torch.float64).reshape(1)
        return float(self._all_reduce_small(bad, dist.ReduceOp.MAX)[0]) == 0.0

    def _balance(self, gamma: float) -> ExpertLoad:
        """Sum this step's expert loads over every rank holding each layer, update the router biases
        on every copy alike by `gamma`; return the worst layer's load over the whole model (every
        rank)."""
        def sum_over_copies(counts: torch.Tensor) -> None:  # [layers here, experts]
            if len(self.parts.groups.ranks["shard"]) > 1:
                dist.all_reduce(counts, group=self.parts.groups.shard)

        counts = update_router_biases(self.parts.moe, gamma, sum_over_copies)
        # Each rank holds some layers: gather every rank's worst and keep the worst of those, so max
        # and mean come from the same layer.
        mine = worst_layer_load(counts)
        table = torch.zeros(self.parts.topo.world_size, 3, dtype=torch.float64)  # [rank, (ratio, max, mean)]
        if mine.layer is not None:
            table[self.rank] = torch.tensor([mine.max_over_mean, mine.max_load, mine.mean_load])
        table = self._all_reduce_small(table)
        worst = int(table[:, 0].argmax())
        if float(table[worst, 0]) == 0.0:  # no MoE layer anywhere
            return ExpertLoad(layer=None, max_load=0.0, mean_load=0.0)
        return ExpertLoad(layer=worst, max_load=float(table[worst, 1]), mean_load=float(table[worst, 2]))

    def _routing_summary(self) -> dict[str, float]:
        """This step's token routing over the EP groups (every rank's layers), then reset."""
        if self.parts.placement is None:
            return {}
        local = self.parts.routing.as_tensor()
        self.parts.routing.reset()
        # clones: on the CPU the all-reduce works in place on the tensor it is given
        summed = self._all_reduce_small(local.clone())
        return routing_summary(summed, self._all_reduce_small(local.clone(), dist.ReduceOp.MAX))

    def _all_reduce_small(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """All-reduce a small bookkeeping tensor over the world, on this rank's device (NCCL needs
        device tensors; gloo takes CPU ones), returned on the CPU."""
        t = t.to(self.device)
        dist.all_reduce(t, op=op)
        return t.cpu()

    def _metrics(
        self, trace: StepTrace, lr, recipe: RecipeValues, grad_norm, load: ExpertLoad, start, gather
    ):
        losses, aux_loss_sum = self.parts.compute.loss_values()
        # The step's losses are token means over the global batch: micro-batch m's mean weighted by
        # its share n_m / N of the trained labels (its MTP depths by their own shares, inside its
        # loss), summed over the last stages of every replica.
        dp = self.cfg.parallel.dp
        share = {mb: batch.loss_scale / dp for mb, batch in enumerate(self.parts.compute.microbatches)}
        local = torch.tensor(
            [
                sum(v["loss"] * share[mb] for mb, v in losses.items()),
                sum(v["lm_loss"] * share[mb] for mb, v in losses.items()),
                sum(v["mtp_loss"] * share[mb] for mb, v in losses.items()),
                float(len(losses)),
                aux_loss_sum,
            ],
            dtype=torch.float64,
        )
        local = self._all_reduce_small(local)
        loss_mean, lm_mean, mtp_mean, count, aux_sum = local.tolist()
        if round(count) != self.microbatches * self.cfg.parallel.dp:
            raise RuntimeError(f"{self.parts.name}: {count} micro-batch losses, expected M * dp")
        per_rank = torch.zeros(self.parts.topo.world_size, 4, dtype=torch.float64)
        per_rank[self.rank] = torch.tensor(  # float64 throughout: the figures match the timeline exactly
            [trace.busy_s, trace.step_s, trace.exposed_comm_s, trace.exposed_a2a_s], dtype=torch.float64
        )
        per_rank = self._all_reduce_small(per_rank)
        busy, span, exposed = per_rank[:, 0], per_rank[:, 1], per_rank[:, 2]
        step_time = time.perf_counter() - start
        tokens = self.cfg.data.global_batch * self.cfg.model.seq_len
        peak = self.cfg.resources.peak_tflops_per_worker * 1e12 * self.parts.topo.world_size
        records: list[TimelineRecord] = []
        if gather:
            everyone = [None] * self.parts.topo.world_size
            dist.all_gather_object(everyone, trace.records)
            records = [r for rank_records in everyone for r in rank_records]
        base = StepMetrics(
            step=self.step,
            loss=loss_mean,
            lm_loss=lm_mean,
            mtp_loss=mtp_mean,
            aux_loss=aux_sum / max(1, self.parts.total_moe_layers) / self.cfg.parallel.dp,
            lr=lr,
            bias_update_speed=recipe.bias_update_speed,
            mtp_loss_weight=recipe.mtp_loss_weight,
            grad_norm=grad_norm,
            tokens=tokens,
            step_time_s=step_time,
            load_imbalance=load.max_over_mean,
            max_expert_load=load.max_load,
            mean_expert_load=load.mean_load,
        )
        return PipelineStepMetrics(
            base=base,
            routing=self._routing_summary(),
            mfu=(tokens / step_time) * self.flops_per_token / peak if peak > 0 else None,
            bubble_fraction=float(1.0 - busy.mean() / span.max()) if float(span.max()) > 0 else 0.0,
            exposed_comm_s=exposed.tolist(),
            exposed_a2a_s=per_rank[:, 3].tolist(),
            records=records,
        )

    # ---- evaluation -------------------------------------------------------------------------------
    def evaluate(self, num_batches: int | None = None) -> EvalResult | None:
        """LM cross-entropy and objective over the first `num_batches` held-out batches
        (run.eval_batches), the same on every rank; None when there is no held-out data. Every rank
        must call it.

        Each dp replica evaluates its rows of every held-out batch, split into the step's M
        micro-batches, through the same executor and stage placement as training, on forward-only
        lists (schedules.forward_only): the same routes, no schedule-specific walk of its own.
        Every rank reads the rows (every stage's attention reads packed rows' segments). Each
        held-out batch's figures are means over its trained labels, its micro-batches weighted as
        a training step weighs them; the result is their mean over batches, as the reference loop
        computes it. The objective weights MTP by the last trained step's lambda, as the reference
        loop does. Expert loads counted here are discarded so they never move the router biases."""
        if not self.has_val:
            return None
        num_batches = num_batches or self.cfg.run.eval_batches
        par = self.cfg.parallel
        mtp_loss_weight = recipe_after(self.step, self.cfg).mtp_loss_weight
        total = torch.zeros(2, dtype=torch.float64)  # [lm loss, objective], shares summed over batches
        self.parts.rank_module.eval()
        try:
            for i in range(num_batches):
                microbatches = self._replica_microbatches(lambda r, n, i=i: self.source.val_batch(i, r, n))
                self.parts.eval_compute.start(microbatches, mtp_loss_weight)
                self.parts.eval_executor.run()
                for mb, loss in self.parts.eval_compute.losses.items():
                    share = microbatches[mb].loss_scale / par.dp
                    total += torch.tensor([loss["lm_loss"], loss["loss"]], dtype=torch.float64) * share
        finally:
            for m in self.parts.moe:
                m.reset_load()
            self.parts.routing.reset()  # evaluation's dispatches are not the step's routing
            self.parts.rank_module.train()
        lm_sum, objective_sum = self._all_reduce_small(total).tolist()
        return EvalResult(lm_loss=lm_sum / num_batches, objective=objective_sum / num_batches)

    # ---- checkpoints (`platform.engine.rank_checkpoint.RankCheckpoints`) -------------------------
    def save_checkpoint(self, wait: bool = False) -> str:
        """Every rank: this rank's shard of the checkpoint of `self.step` (RankCheckpoints.save)."""
        return self.checkpoints.save(self.step, self.data_skip, wait)

    def completed_checkpoints(self, wait: bool = False) -> list[tuple[int, str]]:
        return self.checkpoints.completed(wait)

    def load(self, path: str, storage: Storage | None = None) -> tuple[CheckpointMeta, bool]:
        """Restore the checkpoint at `path` into this rank (any layout wrote it); the next step
        trained is its step + 1, on the batch after its data position."""
        meta, same_layout = self.checkpoints.load(path, storage)
        self.step, self.data_skip = meta.step, data_skip(meta)
        for m in self.parts.moe:
            m.reset_load()
        self.parts.routing.reset()
        return meta, same_layout

    # ---- the Trainer's questions ------------------------------------------------------------------
    def agree_on(self, pick: Callable[[], int | None]) -> int | None:
        """Rank 0's `pick()` (a step, or None), taken by every rank."""
        mine = torch.zeros(1, dtype=torch.float64)  # rank 0's choice, summed over the world
        if self.rank == 0:
            found = pick()
            mine[0] = -1 if found is None else found
        step = int(self._all_reduce_small(mine)[0])
        return None if step < 0 else step

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank (every rank calls it at the same point)."""
        return bool(self._all_reduce_small(torch.tensor([float(flag)]), dist.ReduceOp.MAX)[0] > 0)

    def failure_checkpoint_blocker(self, agreed_stop: bool) -> str | None:
        if agreed_stop:
            return None
        return "a pipeline checkpoint needs every rank alive at the same step; the newest periodic one stands"

    def open_report(self, log, resumed_from: str | None, outputs=None) -> PipelineReport:
        peak = self.cfg.resources.peak_tflops_per_worker * 1e12 * self.parts.topo.world_size
        return PipelineReport(
            self.cfg,
            rank_params=sum(p.numel() for p in self.parts.rank_module.parameters()),
            log=log,
            start_step=self.step,
            resumed_from=resumed_from,
            flops_per_token=self.flops_per_token,
            peak_flops=peak or None,
        )

    def finish(self) -> None:
        """Every rank, after the last step: a barrier, so no rank leaves while a peer still writes."""
        dist.barrier()
