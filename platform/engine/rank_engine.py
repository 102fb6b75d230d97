"""One pipeline rank's training state and its optimizer step.

`RankEngine(cfg, rank, world_size)` (platform/train/pipeline.py drives it) is built after torch.distributed is initialised (by Ray
Train's TorchConfig, or by a test that spawns gloo processes). Per optimizer step (`train_step`):

    data        this dp replica's rows of the global batch, split into M micro-batches in order
                (the reference loop's split: `data.microbatches.split_microbatches`)
    recipe      the step's MTP loss weight and bias update speed (`recipe_at(step)`,
                platform/optim/recipe_schedule.py), the same on every rank
    executor    the schedule's action list for this rank (F / B / W / BW / F&B, async p2p)
    tie         with MTP on 1F1B/ZB1P: sum the embedding gradient of the first and last stage
    optimizer   ZeRO (DeepSpeed) or plain: reduce over the shard group, global-norm clip, AdamW at
                `lr_at(step)` (platform/optim/zero_step.py)
    balance     expert loads summed over every rank holding the layer, router-bias update
                (platform/optim/bias_update.py)
    metrics     losses, grad norm, LR, tokens/s, MFU, expert load, bubble, exposed comm (all ranks
                contribute; rank 0 formats and records them)

Around the steps, for the Trainer: `evaluate` (each dp replica evaluates its rows of every held-out
batch through the same executor and stage placement, on forward-only lists), `save_checkpoint`
(every rank writes its shard; rank 0 commits with world {pp, dp, ep}), `load` (any layout wrote the
checkpoint), and the collective choices `agree_on` and `any_rank`.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from moeforge.kernels.settings import set_reserved_sms
from moeforge.model.balance import ExpertLoad, worst_layer_load
from moeforge.platform.checkpoint.async_writer import AsyncCheckpointWriter
from moeforge.platform.checkpoint.reshard import ModelState, model_layout
from moeforge.platform.checkpoint.resume import checkpoint_commit, data_skip, restore_checkpoint
from moeforge.platform.checkpoint.state import RNGState
from moeforge.platform.checkpoint.store import CheckpointMeta, checkpoint_path, commit_checkpoint, save_shard
from moeforge.platform.config.train import TrainConfig
from moeforge.platform.data.microbatches import default_batch_source, inputs_and_labels, split_microbatches
from moeforge.platform.engine.executor import PipelineExecutor, StepTrace
from moeforge.platform.engine.p2p import P2P, open_links
from moeforge.platform.engine.stage_compute import ForwardCompute, MicroBatch, ModelCompute
from moeforge.platform.engine.stages import StageChunk, build_rank, split_layers
from moeforge.platform.engine.step_clock import clock_for
from moeforge.platform.engine.topology import Topology, create_process_groups
from moeforge.platform.moe.expert_placement import expert_placement
from moeforge.platform.moe.install import install_dispatch
from moeforge.platform.moe.routing_stats import RoutingStats, routing_summary
from moeforge.platform.optim.bad_steps import LOSS_SPIKE_FACTOR, injected_data_fault
from moeforge.platform.optim.bias_update import set_balance_loss_scale, update_router_biases
from moeforge.platform.optim.lr_schedule import lr_at
from moeforge.platform.optim.plain_step import PlainStep
from moeforge.platform.optim.recipe_schedule import RecipeValues, recipe_after, recipe_at
from moeforge.platform.optim.zero_step import ZeroStep
from moeforge.platform.outputs.grad_dump import dump_pipeline_grads
from moeforge.platform.outputs.metrics import EvalResult, StepMetrics
from moeforge.platform.outputs.pipeline_report import PipelineReport
from moeforge.platform.outputs.storage import Storage, open_storage
from moeforge.platform.outputs.timeline import TimelineRecord
from moeforge.platform.plan.accounting import estimate
from moeforge.platform.precision import apply_precision, compute_context, warm_up_fp8_kernels
from moeforge.platform.schedules import build_schedule, forward_only


class InjectedFault(RuntimeError):
    """Raised by the test-only parallel.fault_injection hook."""


@dataclass
class PipelineStepMetrics:
    """StepMetrics plus what only a pipeline run measures."""

    base: StepMetrics
    mfu: float
    bubble_fraction: float  # measured: 1 - mean compute time / step time over ranks
    exposed_comm_s: list[float]  # per world rank: time blocked on transfers
    exposed_a2a_s: list[float] = field(default_factory=list)  # per world rank: blocked on phase all-to-alls
    records: list[TimelineRecord] = field(default_factory=list)  # rank 0, when gathered
    routing: dict[str, float] = field(default_factory=dict)  # EP: ranks and nodes per token

    def pipeline_fields(self) -> dict:
        """The pipeline's own figures, as metrics.jsonl records them beside the base metrics."""
        return {
            "mfu": self.mfu,
            "bubble_fraction": self.bubble_fraction,
            "exposed_comm_s": max(self.exposed_comm_s),
            "exposed_comm_s_per_rank": self.exposed_comm_s,
            "exposed_a2a_s": max(self.exposed_a2a_s, default=0.0),
            **self.routing,
        }

    def to_dict(self) -> dict:
        return {**self.base.to_dict(), **self.pipeline_fields()}


class RankEngine:
    """Everything one rank holds: its stage chunks, executor, optimizer and data view (the Trainer's
    StepEngine for a pipeline rank: platform/train/trainer.py runs the loop around it)."""

    distributed = True

    def __init__(
        self,
        cfg: TrainConfig,
        rank: int,
        world_size: int,
        source=None,
        device: torch.device | str = "cpu",
        log: Callable[[str], None] = print,
    ) -> None:
        par = cfg.parallel
        self.cfg, self.rank = cfg, rank
        self.device = torch.device(device)
        self.topo = Topology.for_schedule(
            par.schedule, par.pp, par.dp, par.ep, tied_embedding=cfg.model.num_nextn_predict_layers > 0
        )
        if world_size != self.topo.world_size:
            raise RuntimeError(
                f"world size {world_size} != parallel.pp * parallel.dp = {self.topo.world_size}"
            )
        self.pp_rank, self.dp_rank = self.topo.coords(rank)
        self.reports = rank == 0  # rank 0 keeps the run's record
        self.name = f"rank {rank} (pp {self.pp_rank}, dp {self.dp_rank})"
        self.groups = create_process_groups(self.topo, rank)
        self.schedule = build_schedule(par.schedule, par.pp, par.microbatches)
        self.microbatches = par.microbatches

        specs = split_layers(cfg.model.num_hidden_layers, self.topo.num_stages, par.layers_per_stage)
        stages = [self.schedule.stage_of(self.pp_rank, c) for c in range(self.schedule.chunks_per_rank)]
        # Expert parallelism: this rank's slice of every MoE layer's experts (platform/moe).
        self.placement = expert_placement(par, cfg.model.n_routed_experts, self.groups, rank)
        self.model, self.module = build_rank(
            cfg.model, [specs[s] for s in stages], cfg.run.seed, self.device, experts=self.placement
        )
        # The precision policy swaps this rank's GEMM modules in place (shared with self.model), as the
        # reference loop does for the whole model; its deferrable layers give the cheap B/W split.
        apply_precision(self.module, cfg.precision)
        set_reserved_sms(par.comm_sms)  # persistent FP8 GEMMs leave these SMs to NCCL
        self.routing = RoutingStats()
        expert_params: list[torch.nn.Parameter] = []
        if self.placement is not None:
            install_dispatch(
                self.module.moe_layers(),
                self.placement,
                self.groups.ep,
                cfg.precision.fp8_linear,
                self.routing,
                counts_group=self.groups.ep_counts,  # its own stream under NCCL (topology.py)
            )
            expert_params = [p for m in self.module.moe_layers() for p in m.experts.parameters()]
        self.chunks = {c: StageChunk(self.model, specs[s], self.module) for c, s in enumerate(stages)}
        self.holds_data = any(specs[s].first or specs[s].last for s in stages)
        self.moe = self.module.moe_layers()
        self.total_moe_layers = len(self.model.moe_layers())
        set_balance_loss_scale(self.moe, cfg.model.seq_aux_loss_alpha, 1.0 / self.microbatches)

        self.p2p = P2P(
            rank,
            par.p2p_timeout_s,
            self.groups.links,
            name=self.name,
            timeline_rank=rank,
            device=self.device,
            clock=clock_for(self.device),
            host_waits=dist.get_backend() != "nccl",
        )
        open_links(self.p2p, self.topo.p2p_links())
        # Stages exchange the residual stream in its own dtype (BF16 under bf16/fp8): what the
        # single-process model passes between the same blocks, at half the bytes of FP32.
        act_dtype = getattr(torch, cfg.precision.compute_dtype)
        self.compute = ModelCompute(
            self.chunks,
            act_dtype=act_dtype,
            loss_scale=1.0 / self.microbatches,
            context=lambda: compute_context(cfg.precision, self.device.type),
            phases=par.chunk_phases,
            tracker=self.p2p,
            overlap_order=par.overlap_order,
        )
        rows = cfg.data.global_batch // (par.dp * par.microbatches)

        def executor(schedule, compute, fault=None, overlap=False) -> PipelineExecutor:
            return PipelineExecutor(
                schedule,
                self.pp_rank,
                compute,
                self.p2p,
                world_rank_of=lambda q: self.topo.rank_of(q, self.dp_rank),
                act_shape=(rows, cfg.model.seq_len, cfg.model.hidden_size),
                act_dtype=act_dtype,
                recv_lookahead=par.recv_lookahead,
                fault=fault,
                overlap=overlap,
            )

        self.executor = executor(self.schedule, self.compute, fault=self._maybe_fault, overlap=par.overlap)
        # Evaluation: the same executor and transfers over forward-only lists of the same placement.
        self.eval_compute = ForwardCompute(self.chunks, context=self.compute.context, act_dtype=act_dtype)
        self.eval_executor = executor(forward_only(self.schedule), self.eval_compute)

        # The last stage's copy of the embedding (1F1B/ZB1P with MTP) is tied to the first stage's.
        tie = self.groups.ranks["tie"]
        self.tied = [self.module.embed.weight] if tie else []
        replicated = self.tied if tie and self.pp_rank == par.pp - 1 else []
        if par.zero_stage == 0:
            self.opt = PlainStep(
                self.module,
                cfg.optim,
                cfg.precision,
                self.groups,
                self.schedule.param_copies,
                replicated,
                expert_params,
            )
        else:
            self.opt = ZeroStep(
                self.module,
                cfg.optim,
                cfg.precision,
                self.groups,
                rank,
                par.zero_stage,
                self.schedule.param_copies,
                replicated,
                expert_params,
                bucket_elements=par.zero_bucket_elements,
            )

        self.source = source
        if self.source is None and self.holds_data:
            self.source = default_batch_source(cfg)
        self.flops_per_token = estimate(cfg.model).run_flops_per_token
        self.step = 0
        self.data_skip = 0  # global batches skipped by loss-spike rollbacks: step s reads batch s + skip
        ck = cfg.checkpoint
        self.writer = (
            AsyncCheckpointWriter(cfg.run.dir, failure=ck.async_failure, log=log)  # the run log
            if ck.async_save and ck.every
            else None
        )
        # Evaluation needs held-out data on every rank that reads tokens; middle stages follow.
        has_val = 1.0 if not self.holds_data or getattr(self.source, "has_val", False) else 0.0
        self.has_val = bool(self._all_reduce_small(torch.tensor([has_val]), dist.ReduceOp.MIN)[0] > 0)

    def warm_up(self) -> str | None:
        """Every rank: compile and tune this rank's Triton kernels on the step's shapes, then a
        barrier, so that compilation never counts against a peer's p2p or collective timeout.
        Returns rank 0's log line (the slowest rank's time), or None where nothing was compiled."""
        cfg = self.cfg
        tokens = cfg.data.global_batch // (cfg.parallel.dp * self.microbatches) * cfg.model.seq_len
        fp8_dispatch = self.placement is not None and cfg.precision.fp8_linear
        report = warm_up_fp8_kernels(self.module, cfg.precision, tokens, fp8_dispatch)
        dist.barrier()
        slowest, launches = self._all_reduce_small(
            torch.tensor([report.seconds, float(report.launches)], dtype=torch.float64), dist.ReduceOp.MAX
        ).tolist()
        if launches == 0 or self.rank != 0:
            return None
        return f"{report.summary()}; slowest rank {slowest:.1f} s"

    # ---- one optimizer step -----------------------------------------------------------------------
    def _maybe_fault(self) -> None:
        fault = self.cfg.parallel.fault_injection
        if not fault or fault.get("rank") != self.rank or fault.get("step") != self.step:
            return
        if fault["kind"] == "sigkill":
            # The process dies as a lost node's would: no exception, no cleanup. Once per run.dir
            # (a marker written first), so the restarted worker group trains through this step.
            storage = open_storage(self.cfg.run.dir)
            marker = f"fault_injection.rank{self.rank}.step{self.step}"
            if storage.exists(marker):
                return
            storage.write_text(marker, "fired\n")
            os.kill(os.getpid(), signal.SIGKILL)
        if fault["kind"] == "sigterm":  # a scheduler's stop, mid-step: the Trainer stops every rank after it
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if fault["kind"] == "raise":
            raise InjectedFault(f"{self.name}: injected fault at step {self.step} (parallel.fault_injection)")
        while True:  # "hang": never send again; the peers' p2p timeout must end the run
            time.sleep(1.0)

    def _microbatches(self) -> list[MicroBatch]:
        if not self.holds_data:  # middle stages never read tokens
            return []
        batch = self.source.batch(self.step + self.data_skip, self.dp_rank, self.cfg.parallel.dp)
        batch = batch.to(self.device)
        return [MicroBatch(*inputs_and_labels(t)) for t in split_microbatches(batch, self.microbatches)]

    def train_step(self, timeline: bool = False) -> PipelineStepMetrics:
        start = time.perf_counter()
        recipe = recipe_at(self.step, self.cfg)
        self.compute.start_step(self._microbatches(), recipe.mtp_loss_weight)
        dist.barrier()  # a common start for every rank's timeline
        trace = self.executor.run()
        grads = self.compute.take_grads()
        for p in self.tied:  # sum the first and last stage's embedding gradients
            # No loop variable keeps the gradient alive: the optimizer step consumes `grads`.
            dist.all_reduce(grads.setdefault(id(p), torch.zeros_like(p)), group=self.groups.tie)
        fault = injected_data_fault(self.cfg.parallel, self.step + self.data_skip)
        if fault == "nan_grad" and grads:
            next(iter(grads.values())).fill_(float("nan"))
        if self.step == 0:  # writes only under MOEFORGE_DUMP_GRADS (a test and debugging aid)
            dump_pipeline_grads(self, grads)
        lr = lr_at(self.step, self.cfg.optim, self.cfg.run.steps)
        if self._step_is_finite(grads):
            grad_norm = self.opt.step(grads, lr)
            load = self._balance(recipe.bias_update_speed)
            skipped = False
        else:  # platform/optim/bad_steps.py: no update, on every rank alike
            grads.clear()
            for m in self.moe:
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
        checks += [torch.isfinite(v["loss"]).reshape(1).to(self.device) for v in self.compute.losses.values()]
        finite = torch.cat(checks).all() if checks else torch.tensor(True, device=self.device)
        bad = (~finite).to(torch.float64).reshape(1)
        return float(self._all_reduce_small(bad, dist.ReduceOp.MAX)[0]) == 0.0

    def _balance(self, gamma: float) -> ExpertLoad:
        """Sum this step's expert loads over every rank holding each layer, update the router biases
        on every copy alike by `gamma`; return the worst layer's load over the whole model (every
        rank)."""
        def sum_over_copies(counts: torch.Tensor) -> None:  # [layers here, experts]
            if len(self.groups.ranks["shard"]) > 1:
                dist.all_reduce(counts, group=self.groups.shard)

        counts = update_router_biases(self.moe, gamma, sum_over_copies)
        # Each rank holds some layers: gather every rank's worst and keep the worst of those, so max
        # and mean come from the same layer.
        mine = worst_layer_load(counts)
        table = torch.zeros(self.topo.world_size, 3, dtype=torch.float64)  # [rank, (ratio, max, mean)]
        if mine.layer is not None:
            table[self.rank] = torch.tensor([mine.max_over_mean, mine.max_load, mine.mean_load])
        table = self._all_reduce_small(table)
        worst = int(table[:, 0].argmax())
        if float(table[worst, 0]) == 0.0:  # no MoE layer anywhere
            return ExpertLoad(layer=None, max_load=0.0, mean_load=0.0)
        return ExpertLoad(layer=worst, max_load=float(table[worst, 1]), mean_load=float(table[worst, 2]))

    def _routing_summary(self) -> dict[str, float]:
        """This step's token routing over the EP groups (every rank's layers), then reset."""
        if self.placement is None:
            return {}
        local = self.routing.as_tensor()
        self.routing.reset()
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
        losses, aux_loss_sum = self.compute.loss_values()
        local = torch.tensor(
            [
                sum(v["loss"] for v in losses.values()),
                sum(v["lm_loss"] for v in losses.values()),
                sum(v["mtp_loss"] for v in losses.values()),
                float(len(losses)),
                aux_loss_sum,
            ],
            dtype=torch.float64,
        )
        local = self._all_reduce_small(local)
        loss_sum, lm_sum, mtp_sum, count, aux_sum = local.tolist()
        if round(count) != self.microbatches * self.cfg.parallel.dp:
            raise RuntimeError(f"{self.name}: {count} micro-batch losses, expected M * dp")
        per_rank = torch.zeros(self.topo.world_size, 4, dtype=torch.float64)
        per_rank[self.rank] = torch.tensor(  # float64 throughout: the figures match the timeline exactly
            [trace.busy_s, trace.step_s, trace.exposed_comm_s, trace.exposed_a2a_s], dtype=torch.float64
        )
        per_rank = self._all_reduce_small(per_rank)
        busy, span, exposed = per_rank[:, 0], per_rank[:, 1], per_rank[:, 2]
        step_time = time.perf_counter() - start
        tokens = self.cfg.data.global_batch * self.cfg.model.seq_len
        peak = self.cfg.parallel.peak_tflops_per_worker * 1e12 * self.topo.world_size
        records: list[TimelineRecord] = []
        if gather:
            everyone = [None] * self.topo.world_size
            dist.all_gather_object(everyone, trace.records)
            records = [r for rank_records in everyone for r in rank_records]
        base = StepMetrics(
            step=self.step,
            loss=loss_sum / count,
            lm_loss=lm_sum / count,
            mtp_loss=mtp_sum / count,
            aux_loss=aux_sum / max(1, self.total_moe_layers) / self.cfg.parallel.dp,
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
            mfu=(tokens / step_time) * self.flops_per_token / peak if peak > 0 else 0.0,
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
        lists (schedules.forward_only): the same routes, no schedule-specific walk of its own. The
        mean over micro-batches and replicas is the mean over every held-out token (equal sizes).
        The objective weights MTP by the last trained step's lambda, as the reference loop does.
        Expert loads counted here are discarded so they never move the router biases."""
        if not self.has_val:
            return None
        num_batches = num_batches or self.cfg.run.eval_batches
        par = self.cfg.parallel
        mtp_loss_weight = recipe_after(self.step, self.cfg).mtp_loss_weight
        total = torch.zeros(3, dtype=torch.float64)  # [lm loss sum, objective sum, micro-batches]
        self.module.eval()
        try:
            for i in range(num_batches):
                microbatches = []
                if self.holds_data:
                    batch = self.source.val_batch(i, self.dp_rank, par.dp).to(self.device)
                    microbatches = [
                        MicroBatch(*inputs_and_labels(t))
                        for t in split_microbatches(batch, self.microbatches)
                    ]
                self.eval_compute.start(microbatches, mtp_loss_weight)
                self.eval_executor.run()
                for loss in self.eval_compute.losses.values():
                    total += torch.tensor([loss["lm_loss"], loss["loss"], 1.0], dtype=torch.float64)
        finally:
            for m in self.moe:
                m.reset_load()
            self.routing.reset()  # evaluation's dispatches are not the step's routing
            self.module.train()
        lm_sum, objective_sum, count = self._all_reduce_small(total).tolist()
        return EvalResult(lm_loss=lm_sum / count, objective=objective_sum / count)

    # ---- checkpoints ------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        """This rank's checkpoint parts: its stage modules (weights and router-bias buffers, full-model
        names, routed experts as this EP rank's rows of the whole layer), its optimizer state by
        parameter name (platform/optim/zero_step.py) and its RNG states. Model and optimizer are
        pieces of the whole model's tensors, so any layout can resume them
        (platform/checkpoint/reshard.py)."""
        if self.placement is None:
            layout = model_layout(self.module)
        else:
            layout = model_layout(self.module, self.placement.n_experts, self.placement.first_local_expert)
        return {
            "model": ModelState(self.module, layout),
            "optimizer": self.opt.state(layout),
            "rng": RNGState(),
        }

    def save_checkpoint(self, wait: bool = False) -> str:
        """Every rank: write this rank's shard of the checkpoint of `self.step`; barrier; rank 0
        commits it (meta.json, COMPLETE, pruning). With checkpoint.async every rank snapshots its
        state and writes it in the background instead, and rank 0's writer commits once every
        shard's manifest is on storage (no barrier: platform/checkpoint/async_writer.py); with `wait`
        every rank writes at once. Returns the checkpoint's path."""
        cfg = self.cfg
        world = {"pp": self.topo.pp, "dp": self.topo.dp, "ep": self.topo.ep}
        commit = checkpoint_commit(cfg, self.step, self.data_skip, world, cfg.parallel.schedule)
        shard = (self.pp_rank, self.dp_rank)
        if self.writer is not None and not wait:
            self.writer.submit(
                self.step, self.checkpoint_state(), shard=shard, commit=commit if self.rank == 0 else None
            )
            return checkpoint_path(cfg.run.dir, self.step)
        path = save_shard(cfg.run.dir, self.step, self.checkpoint_state(), shard=shard)
        dist.barrier()  # every shard is written before rank 0 checks them
        if self.rank == 0:
            path = commit_checkpoint(cfg.run.dir, self.step, **commit)
        return path

    def completed_checkpoints(self, wait: bool = False) -> list[tuple[int, str]]:
        """Background checkpoints completed since the last call (all in flight, with `wait`); a
        background failure raises here under checkpoint.async_failure=fail. Empty when writes are
        synchronous."""
        if self.writer is None:
            return []
        return self.writer.wait() if wait else self.writer.poll()

    def load(self, path: str, storage: Storage | None = None) -> tuple[CheckpointMeta, bool]:
        """Restore the checkpoint at `path` into this rank (any layout wrote it); the next step
        trained is its step + 1, on the batch after its data position."""
        meta, same_layout = restore_checkpoint(
            self.cfg, path, self.checkpoint_state(), shard=(self.pp_rank, self.dp_rank), storage=storage
        )
        self.step, self.data_skip = meta.step, data_skip(meta)
        for m in self.moe:
            m.reset_load()
        self.routing.reset()
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

    def interruptible(self) -> bool:
        """Never mid-step: the peers would wait on this rank's transfers. A SIGTERM is agreed at the
        step boundary instead."""
        return False

    def failure_checkpoint_blocker(self, agreed_stop: bool) -> str | None:
        if agreed_stop:
            return None
        return "a pipeline checkpoint needs every rank alive at the same step; the newest periodic one stands"

    def open_report(self, log, resumed_from: str | None, outputs=None) -> PipelineReport:
        peak = self.cfg.parallel.peak_tflops_per_worker * 1e12 * self.topo.world_size
        return PipelineReport(
            self.cfg,
            rank_params=sum(p.numel() for p in self.module.parameters()),
            log=log,
            start_step=self.step,
            resumed_from=resumed_from,
            flops_per_token=self.flops_per_token,
            peak_flops=peak or None,
        )

    def finish(self) -> None:
        """Every rank, after the last step: the run's parameters written (`save_params`), then a
        barrier so no rank leaves while a peer still writes."""
        self.save_params(self.cfg.run.dir)
        dist.barrier()

    # ---- outputs ----------------------------------------------------------------------------------
    def save_params(self, run_dir: str) -> str | None:
        """Write this rank's parameters and buffers (full-model names) as safetensors under
        run_dir/params/ (dp replica 0: pp<rank>.safetensors; with expert parallelism, replicas 0..ep-1
        also write their slice of the routed experts to pp<rank>.ep<e>.safetensors under the full
        names); `load_pipeline_params` merges them."""
        ep_rank = self.placement.ep_rank if self.placement is not None else 0
        if self.dp_rank != ep_rank:  # the first EP group of the stage writes
            return None
        from safetensors.torch import save

        expert_names = set()
        if self.placement is not None:
            expert_ids = {id(p) for m in self.moe for p in m.experts.parameters()}
            expert_names = {n for n, p in self.module.named_parameters() if id(p) in expert_ids}
        state = {k: v.detach().contiguous().clone() for k, v in self.module.state_dict().items()}
        storage = open_storage(run_dir)
        url = None
        if self.dp_rank == 0:
            rel = f"params/pp{self.pp_rank}.safetensors"
            storage.write_bytes(rel, save({k: v for k, v in state.items() if k not in expert_names}))
            url = storage.url(rel)
        if expert_names:
            rel = f"params/pp{self.pp_rank}.ep{ep_rank}.safetensors"
            storage.write_bytes(rel, save({k: state[k] for k in sorted(expert_names)}))
        return url
