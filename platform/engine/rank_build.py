"""Building one pipeline rank: everything it holds before its first step.

`assemble_rank(cfg, rank, world_size, device)` runs after torch.distributed is initialised, on every
rank at once (process groups are collective), and returns the rank's `RankParts`:

    topology     where the rank sits (pp, dp; EP inside dp) and its process groups
    model        the whole Transformer on meta, and the rank's stages of it materialised
                 (`rank_module`), with its slice of every MoE layer's experts under EP, starting
                 from init.from's weights when set (only this rank's tensors are read); the precision
                 policy swapped in; the all-to-all dispatch installed on its MoE layers
    transfers    point-to-point links to its pipeline neighbours
    compute      the chunk compute and the schedule's executor, for training and for evaluation
    optimizer    the plain step or the ZeRO (DeepSpeed) step over the rank's parameters
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from moeforge.kernels.settings import set_reserved_sms
from moeforge.model.transformer import MoE, Transformer
from moeforge.platform.checkpoint.init_from import load_initial_weights
from moeforge.platform.config.train import TrainConfig
from moeforge.platform.engine.executor import PipelineExecutor
from moeforge.platform.engine.p2p import P2P, open_links
from moeforge.platform.engine.stages import (
    ForwardCompute,
    ModelCompute,
    RankModule,
    StageChunk,
    build_rank,
    split_layers,
)
from moeforge.platform.engine.step_clock import clock_for
from moeforge.platform.engine.topology import ProcessGroups, Topology, create_process_groups
from moeforge.platform.moe.expert_placement import ExpertPlacement, expert_placement
from moeforge.platform.moe.install import install_dispatch
from moeforge.platform.moe.routing_stats import RoutingStats
from moeforge.platform.optim.plain_step import PlainStep
from moeforge.platform.optim.zero_step import ZeroStep
from moeforge.platform.precision import apply_precision, compute_context
from moeforge.platform.schedules import Schedule, build_schedule, forward_only


@dataclass
class RankParts:
    """What one rank holds (see the module docstring)."""

    rank: int
    name: str  # "rank r (pp p, dp d)", for messages
    topo: Topology
    pp_rank: int
    dp_rank: int
    groups: ProcessGroups
    schedule: Schedule
    placement: ExpertPlacement | None  # this rank's experts under EP, else None
    meta_model: Transformer  # the whole model on meta: names and structure, no storage
    rank_module: RankModule  # this rank's stages, materialised: what trains
    chunks: dict[int, StageChunk]  # by chunk index on this rank
    moe: list[MoE]  # this rank's MoE layers
    total_moe_layers: int  # in the whole model
    routing: RoutingStats  # EP: where this rank's tokens went
    p2p: P2P
    compute: ModelCompute
    executor: PipelineExecutor
    eval_compute: ForwardCompute
    eval_executor: PipelineExecutor
    tied: list[torch.nn.Parameter]  # the embedding, when the first and last stage share it
    opt: PlainStep | ZeroStep


def assemble_rank(
    cfg: TrainConfig,
    rank: int,
    world_size: int,
    device: torch.device,
    fault: Callable[[], None] | None = None,
    init_weights: bool = True,
) -> RankParts:
    """Build this rank's parts (collective: every rank calls it). `fault` is the executor's test-only
    fault hook (debug.fault_injection). `init_weights`: read `init.from`'s weights (a run about
    to resume its own checkpoint does not: they would be replaced at once)."""
    par = cfg.parallel
    topo = Topology.for_schedule(
        par.schedule, par.pp, par.dp, par.ep, tied_embedding=cfg.model.num_nextn_predict_layers > 0
    )
    if world_size != topo.world_size:
        raise RuntimeError(f"world size {world_size} != parallel.pp * parallel.dp = {topo.world_size}")
    pp_rank, dp_rank = topo.coords(rank)
    name = f"rank {rank} (pp {pp_rank}, dp {dp_rank})"
    groups = create_process_groups(topo, rank)
    schedule = build_schedule(par.schedule, par.pp, par.microbatches)

    specs = split_layers(cfg.model.num_hidden_layers, topo.num_stages, par.layers_per_stage)
    stages = [schedule.stage_of(pp_rank, c) for c in range(schedule.chunks_per_rank)]
    placement = expert_placement(par, cfg.model.n_routed_experts, groups, rank)  # EP: this rank's experts
    meta_model, rank_module = build_rank(
        cfg.model, [specs[s] for s in stages], cfg.run.seed, device, experts=placement
    )
    if cfg.init.kind is not None and init_weights:  # published or earlier weights: this rank's share only
        load_initial_weights(cfg.model, cfg.init, rank_module)
    # The precision policy swaps this rank's GEMM modules in place (shared with meta_model), as the
    # one-process run does for the whole model; its deferrable layers give the cheap B/W split.
    apply_precision(rank_module, cfg.precision)
    set_reserved_sms(par.comm_sms)  # persistent FP8 GEMMs leave these SMs to NCCL
    routing = RoutingStats()
    expert_params: list[torch.nn.Parameter] = []
    if placement is not None:
        install_dispatch(
            rank_module.moe_layers(),
            placement,
            groups.ep,
            cfg.precision.fp8_linear,
            routing,
            counts_group=groups.ep_counts,  # its own stream under NCCL (`topology.ProcessGroups.ep_counts`)
        )
        expert_params = [p for m in rank_module.moe_layers() for p in m.experts.parameters()]
    chunks = {c: StageChunk(meta_model, specs[s], rank_module) for c, s in enumerate(stages)}

    p2p = P2P(
        rank,
        par.p2p_timeout_s,
        groups.links,
        name=name,
        timeline_rank=rank,
        device=device,
        clock=clock_for(device),
        host_waits=dist.get_backend() != "nccl",
    )
    open_links(p2p, topo.p2p_links())
    # Stages exchange the residual stream in its own dtype (BF16 under bf16/fp8): what the
    # single-process model passes between the same blocks, at half the bytes of FP32.
    act_dtype = getattr(torch, cfg.precision.compute_dtype)
    compute = ModelCompute(
        chunks,
        act_dtype=act_dtype,
        loss_scale=1.0 / par.microbatches,  # for a micro-batch without its own (a step's carry dp * n_m / N)
        context=lambda: compute_context(cfg.precision, device.type),
        phases=par.chunk_phases,
        tracker=p2p,
        overlap_order=par.overlap_order,
    )
    rows = cfg.data.global_batch // (par.dp * par.microbatches)

    def executor(schedule, compute, fault=None, overlap=False) -> PipelineExecutor:
        return PipelineExecutor(
            schedule,
            pp_rank,
            compute,
            p2p,
            world_rank_of=lambda q: topo.rank_of(q, dp_rank),
            act_shape=(rows, cfg.model.seq_len, cfg.model.hidden_size),
            act_dtype=act_dtype,
            recv_lookahead=par.recv_lookahead,
            fault=fault,
            overlap=overlap,
        )

    # Evaluation: the same executor and transfers over forward-only lists of the same placement.
    eval_compute = ForwardCompute(chunks, context=compute.context, act_dtype=act_dtype)

    # The last stage's copy of the embedding (1F1B/ZB1P with MTP) is tied to the first stage's.
    tie = groups.ranks["tie"]
    tied = [rank_module.embed.weight] if tie else []
    replicated = tied if tie and pp_rank == par.pp - 1 else []
    if par.zero_stage == 0:
        opt = PlainStep(
            rank_module, cfg.optim, cfg.precision, groups, schedule.param_copies, replicated, expert_params
        )
    else:
        opt = ZeroStep(
            rank_module,
            cfg.optim,
            cfg.precision,
            groups,
            rank,
            par.zero_stage,
            schedule.param_copies,
            replicated,
            expert_params,
            bucket_elements=par.zero_bucket_elements,
        )
    return RankParts(
        rank=rank,
        name=name,
        topo=topo,
        pp_rank=pp_rank,
        dp_rank=dp_rank,
        groups=groups,
        schedule=schedule,
        placement=placement,
        meta_model=meta_model,
        rank_module=rank_module,
        chunks=chunks,
        moe=rank_module.moe_layers(),
        total_moe_layers=len(meta_model.moe_layers()),
        routing=routing,
        p2p=p2p,
        compute=compute,
        executor=executor(schedule, compute, fault=fault, overlap=par.overlap),
        eval_compute=eval_compute,
        eval_executor=executor(forward_only(schedule), eval_compute),
        tied=tied,
        opt=opt,
    )
