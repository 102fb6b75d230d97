"""The per-rank memory plan of a training run: what one GPU holds at its peak, from a TrainConfig alone.

    plan = plan_memory(train_config)          # every pipeline rank, arithmetic only (no tensors)
    plan.most_loaded.total_bytes, plan.fits   # the rank that decides whether the layout fits
    format_plan(plan), plan.to_dict()         # what moeforge-estimate prints

Every pipeline rank (pp position) is planned; the dp replicas of a position hold the same bytes (each EP
rank holds the same number of experts and, on average, the same number of routed tokens). Bytes are
compared with `resources.gpu_memory_gb`, read as decimal GB (1e9 bytes; 0 = unknown).

Parameters on a rank
--------------------
Stages come from `stages.split_layers` (even, or `parallel.layers_per_stage`) and their placement from
`Topology.stages_of` (DualPipe: stages r and pp-1-r; DualPipeV: r and 2pp-1-r). A rank holds what
`stages.build_rank` builds: its blocks; the embedding on the first stage; the final norm, the head and
the MTP modules on the last stage, plus an embedding copy there when the first stage is elsewhere (MTP
embeds the shifted tokens). With expert parallelism each MoE block keeps n_routed_experts / ep routed
experts; attention, norms, router and shared experts are whole on every rank. Counts come from
`platform.plan.accounting` (`block_params`, `mtp_module_params`);
`tests.test_memory_plan.test_planned_parameters_equal_the_meta_built_rank` holds them to the numel of
meta-built ranks.

Bytes per parameter: what moeforge stores (not V3's BF16 weight copy)
--------------------------------------------------------------------
- weights, 4 B: FP32 and whole on every rank holding them. The module parameters are the master weights
  (`platform.precision.apply_precision` keeps them FP32; BF16 copies exist only inside a GEMM). V3 keeps BF16
  weights beside its FP32 master copy; moeforge has no BF16 weight copy, so it pays 2 B more here.
  Not yet counted: under precision fp8 the e4m3 copies of every FP8 GEMM weight (W and W^T, 2 B per
  such parameter) live from their first use in a step to the optimizer step
  (`kernels.weight_cache.FP8WeightCache`).
- gradients, 4 B: FP32 and full size, under ZeRO-1 and ZeRO-2 alike. The executor accumulates every
  parameter's gradient at full size from the schedule's first W until the step, so that is the peak
  (`platform.optim.zero_step`'s module docstring, "What ZeRO-2 saves here"). V3 accumulates FP32
  gradients too.
- optimizer, ZeRO-1/2 (DeepSpeed): an FP32 master partition (DeepSpeed clones its partition even from
  FP32 parameters) plus AdamW m and v in `precision.adam_moments_dtype`: 4 + 2 x 2 = 8 B per parameter
  with BF16 moments (the fp8 recipe, as V3), 4 + 2 x 4 = 12 B with FP32 moments, divided over the shard
  group (Topology.shard_group: dp, or dp x the DualPipe pair) for dense and replicated parameters, and
  over the expert shard group (shard / ep ranks) for routed experts. ZeRO-0 and the single-process
  loop: torch AdamW on the parameters themselves, moments only, not partitioned. ZeRO-3 (pp = 1 only):
  weights and gradients are partitioned as well (DeepSpeed's stage 3; moeforge's ZeroStep runs 1 and 2).

Activations: the V3 recipe's cache, per token
---------------------------------------------
What one block keeps for its backward, with a = bytes of `precision.compute_dtype` (2 for BF16) and
q(n) = n + 4 * ceil(n / 128) bytes for a row of n values cached as FP8 e4m3 with one FP32 scale per 1x128
tile under precision fp8 (q(n) = a * n otherwise). The recomputation and the FP8 caches are DeepSeek-V3's
(technical report, arXiv:2412.19437, sections 3.2.3 and 3.3.3): "we recompute all RMSNorm operations and
MLA up-projections during back-propagation", inputs of FP8 GEMMs are cached in FP8, and the SwiGLU of the
MoE caches its inputs in FP8 and recomputes its output. Hence, per token:

    attention   a*h        block input (residual; input of the recomputed input norm, whose output -- the
                           q_a/kv_a GEMM input -- is recomputed, FP8 copy included)
              + a*r_q      q_a_proj output c_q (input of the recomputed q_a_layernorm)
              + a*(r_kv + d_rope)   kv_a_proj output: latent + shared RoPE key; q, k, v are recomputed
                           from c_q and the latent (the MLA up-projections)
              + a*H*d_v + 4*H   attention output (attention backward and the o_proj input, one copy:
                           V3 keeps it in its E5M6 format, 1.5 B; moeforge has no E5M6, so BF16) and the
                           softmax log-sum-exp (FP32)
              + a*h        post-attention residual (input of the recomputed post-attention norm)
    dense MLP   2*q(I)     SwiGLU inputs (gate, up outputs); the down_proj input is recomputed. V3 states
                           this for the MoE; the plan applies it to the dense MLPs as well
    MoE         4*E + 12*k router affinities (FP32) and the k gates (FP32) and expert ids (int64)
              + n_shared*2*q(I_moe)   shared experts' SwiGLU inputs (their input is the recomputed norm)
              + k*(q(h) + 2*q(I_moe))  per routed copy: the dispatched token (V3 dispatches FP8 and the
                           expert GEMM caches it) and the expert's SwiGLU inputs; k copies per token land
                           on the EP group's ranks, on average k per token of each rank's own micro-batch.
                           The expert outputs are not kept: the gate's gradient <dY, W_down s> equals
                           <W_down^T dY, s> with the SwiGLU output s, which is recomputed anyway
    first stage 8          token ids (int64)
    last stage  a*h + a*V + 8   final-norm input, logits for the loss backward, labels; the head's input
                           is the recomputed final norm's output
    MTP depth   a*h + block + a*h + a*V + 8   embedding of the shifted tokens (enorm input), its block
                           (input: eh_proj output, whose own input is recomputed from the two norms), the
                           block output (norm input, next depth's hnorm input), logits, shifted ids

A chunk's activation for one micro-batch is (rows x seq_len) tokens times the sum over its parts
(rows = data.global_batch / (dp x microbatches)). The peak replays the schedule's action lists
(`build_schedule`): an activation is live from its F to the end of its input-gradient backward, as the
schedule validator counts (`peak_live_activations`, `claimed_peak_activations`); the plan takes the most
bytes live at once, each live (chunk, micro-batch) weighted by its chunk's bytes, so a rank with unequal
chunks (stage 0 and the last stage) is not charged its largest chunk for every live micro-batch.

Not counted: DeepSpeed's IPG bucket (reduce_bucket_size = parallel.zero_bucket_elements FP32 values,
allocated in full on a GPU), dispatch/combine and point-to-point buffers, the transient second gradient copy of a DualPipe pair's
step, kernel workspaces (attention, GEMMs, the loss), the CUDA context and allocator fragmentation, and
expert load imbalance (a rank receiving more than its average share of routed tokens).

The plan counts what the recipe stores (precision's storage and recompute settings). A run's measured
activation bytes against a BF16 run are `moeforge-bench kernels`' activation-memory rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from moeforge.model.config import ModelConfig
from moeforge.platform.config.builder import ConfigError
from moeforge.platform.config.precision import PrecisionConfig
from moeforge.platform.config.train import TrainConfig
from moeforge.platform.engine.stages import StageSpec, split_layers
from moeforge.platform.engine.topology import Topology
from moeforge.platform.plan.accounting import (
    block_params,
    largest_block_tensor,
    mtp_module_params,
    routed_expert_params,
)
from moeforge.platform.schedules import ScheduleError, build_schedule
from moeforge.platform.schedules.dataflow import compute_parts

FP32_BYTES = 4
INDEX_BYTES = 8  # int64 token ids, labels and expert ids
FP8_TILE = 128  # one FP32 scale per 1x128 tile of a cached FP8 activation row
# What a rank holds on the host while it reads `init.from` weights beyond its parameters and the
# one tensor it is reading (`platform.checkpoint.init_from.load_initial_weights`;
# docs/starting_weights.md): the bound
# `tests.test_init_from.test_a_rank_reads_only_its_share_and_holds_one_tensor_at_a_time` holds.
LOAD_OVERHEAD_BYTES = 4 << 20
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


# ------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------
def rank_param_counts(cfg: ModelConfig, specs: Sequence[StageSpec], ep: int = 1) -> tuple[int, int]:
    """(parameters, of which routed experts) of the rank `stages.build_rank(cfg, specs, experts=...)`
    builds with `ep`-way expert parallelism (ep=1: every expert). Shared Parameters count once."""
    first = any(s.first for s in specs)
    last = any(s.last for s in specs)
    h, vocab = cfg.hidden_size, cfg.vocab_size
    total = routed = 0

    def add_block(layer_idx: int, params: int) -> None:
        nonlocal total, routed
        experts = routed_expert_params(cfg, layer_idx)
        total += params - experts + experts // ep
        routed += experts // ep

    # MTP embeds the shifted tokens, so the last stage needs the embedding too (one Parameter when
    # the first stage is on the same rank).
    if first or (last and cfg.num_nextn_predict_layers > 0):
        total += vocab * h
    for layer_idx in sorted({i for s in specs for i in s.layers}):
        add_block(layer_idx, block_params(cfg, layer_idx))
    if last:
        total += h + vocab * h  # final norm, head (never tied in DeepSeek-V3 models)
        for depth in range(1, cfg.num_nextn_predict_layers + 1):
            add_block(cfg.num_hidden_layers + depth - 1, mtp_module_params(cfg, depth))
    return total, routed


def rank_largest_tensor(cfg: ModelConfig, specs: Sequence[StageSpec]) -> int:
    """Elements of the largest single tensor the rank of `specs` reads from a checkpoint: the
    embedding or output head on an end stage, else its blocks' largest matrix."""
    first = any(s.first for s in specs)
    last = any(s.last for s in specs)
    h = cfg.hidden_size
    sizes = [largest_block_tensor(cfg, i) for i in {i for s in specs for i in s.layers}]
    if first or last:
        sizes.append(cfg.vocab_size * h)
    if last:
        depths = range(1, cfg.num_nextn_predict_layers + 1)
        sizes += [max(2 * h * h, largest_block_tensor(cfg, cfg.num_hidden_layers + d - 1)) for d in depths]
    return max(sizes, default=0)


# ------------------------------------------------------------------------------------------------
# Activations (see the module docstring for every term)
# ------------------------------------------------------------------------------------------------
def _cached(n: int, fp8: bool, a: int) -> int:
    """Bytes of one cached row of n values: FP8 e4m3 + FP32 scale per 1x128 tile, or compute dtype."""
    return n + FP32_BYTES * math.ceil(n / FP8_TILE) if fp8 else a * n


def block_activation_bytes(cfg: ModelConfig, precision: PrecisionConfig, layer_idx: int) -> int:
    """Bytes block `layer_idx` keeps for its backward, per token of the micro-batch (module docstring)."""
    a, fp8 = _DTYPE_BYTES[precision.compute_dtype], precision.fp8_linear
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    attention = (
        a * h  # block input
        + (a * cfg.q_lora_rank if cfg.q_lora_rank is not None else 0)  # c_q
        + a * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # latent + shared RoPE key
        + a * heads * cfg.v_head_dim  # attention output (o_proj input)
        + FP32_BYTES * heads  # log-sum-exp
        + a * h  # post-attention residual
    )
    if not cfg.is_moe_layer(layer_idx):
        return attention + 2 * _cached(cfg.intermediate_size, fp8, a)
    k, inter = cfg.num_experts_per_tok, cfg.moe_intermediate_size
    router = FP32_BYTES * cfg.n_routed_experts + (FP32_BYTES + INDEX_BYTES) * k
    shared = cfg.n_shared_experts * 2 * _cached(inter, fp8, a)
    routed = k * (_cached(h, fp8, a) + 2 * _cached(inter, fp8, a))
    return attention + router + shared + routed


def stage_activation_bytes(cfg: ModelConfig, precision: PrecisionConfig, spec: StageSpec) -> int:
    """Bytes one micro-batch leaves cached in model stage `spec`, per token."""
    a = _DTYPE_BYTES[precision.compute_dtype]
    h, vocab = cfg.hidden_size, cfg.vocab_size
    total = sum(block_activation_bytes(cfg, precision, i) for i in spec.layers)
    if spec.first:
        total += INDEX_BYTES  # token ids for the embedding backward
    if spec.last:
        total += a * h + a * vocab + INDEX_BYTES  # final-norm input, logits, labels
        for depth in range(1, cfg.num_nextn_predict_layers + 1):
            block = block_activation_bytes(cfg, precision, cfg.num_hidden_layers + depth - 1)
            total += a * h + block + a * h + a * vocab + INDEX_BYTES
    return total


def _peak_live(schedule_name: str, pp: int, microbatches: int, chunk_bytes: list[list[int]]):
    """Per pp rank: (most bytes live at once, live micro-batches per chunk at that moment, most live
    micro-batches at once, the schedule's claimed peak). `chunk_bytes[r][c]`: one micro-batch of chunk c."""
    if schedule_name == "single":  # the reference loop: one micro-batch's forward and backward at a time
        return [(chunk_bytes[0][0], (1,), 1, 1)]
    try:
        schedule = build_schedule(schedule_name, pp, microbatches)
    except ScheduleError as err:  # e.g. DualPipe's micro-batch count; the message names the field
        raise ConfigError(f"parallel.{err}") from None
    out = []
    for rank, actions in enumerate(schedule.actions):
        weights = chunk_bytes[rank]
        live = [0] * len(weights)
        best, best_live, most = 0, tuple(live), 0
        for action in actions:
            parts = compute_parts(action)
            # Live from the start of its F to the end of its input-gradient backward
            # (`platform.schedules.validate.peak_live_activations`): an F&B pair's forward is counted
            # before its backward half frees one.
            if parts and parts[0][0] == "F":
                live[parts[0][1]] += 1
                held = sum(n * b for n, b in zip(live, weights))
                most = max(most, sum(live))
                if held > best:
                    best, best_live = held, tuple(live)
            for step, chunk, _mb in parts:
                if step == "B":
                    live[chunk] -= 1
        out.append((best, best_live, most, schedule.claimed_peak_activations[rank]))
    return out


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankPlan:
    """Peak bytes of one pipeline rank (any of its dp replicas)."""

    pp_rank: int
    stages: tuple[int, ...]  # model stages, by local chunk
    layers: tuple[int, ...]  # main-model layer ids
    params: int  # parameter count held
    expert_params: int  # of which routed experts (partitioned over the expert shard group)
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int  # peak, weighted by chunk
    activation_bytes_per_microbatch: tuple[int, ...]  # one micro-batch of each local chunk
    peak_live_by_chunk: tuple[int, ...]  # live micro-batches of each chunk at the activation peak
    peak_live_activations: int  # most (chunk, micro-batch) activations live at once (validator's count)
    claimed_peak_activations: int  # the schedule generator's claim
    largest_tensor: int  # elements of the largest single tensor it reads from a checkpoint

    @property
    def load_bytes(self) -> int:
        """Host bytes while reading `init.from` weights, at most: its parameters (FP32; on a GPU
        they are in device memory instead), the largest tensor read (at FP32, the widest checkpoint
        dtype) and LOAD_OVERHEAD_BYTES."""
        return self.params_bytes + FP32_BYTES * self.largest_tensor + LOAD_OVERHEAD_BYTES

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes

    def to_dict(self) -> dict:
        out = asdict(self)
        out["total_bytes"] = self.total_bytes
        out["load_bytes"] = self.load_bytes
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


@dataclass(frozen=True)
class MemoryPlan:
    """Every pipeline rank's peak bytes, and the layout that produced them."""

    schedule: str
    pp: int
    dp: int
    ep: int
    zero_stage: int  # as configured; the single-process loop has no ZeRO
    precision: str
    microbatches: int
    rows_per_microbatch: int
    seq_len: int
    shard_group_size: int
    expert_shard_group_size: int
    weight_bytes_per_param: int
    grad_bytes_per_param: int
    optimizer_bytes_per_param: int  # before partitioning
    optimizer_partitioned: bool
    gpu_memory_bytes: int  # 0: unknown
    ranks: tuple[RankPlan, ...]

    @property
    def tokens_per_microbatch(self) -> int:
        return self.rows_per_microbatch * self.seq_len

    @property
    def most_loaded(self) -> RankPlan:
        return max(self.ranks, key=lambda r: r.total_bytes)

    @property
    def fits(self) -> bool | None:
        """Whether the most loaded rank fits resources.gpu_memory_gb; None when that is unknown (0)."""
        if not self.gpu_memory_bytes:
            return None
        return self.most_loaded.total_bytes <= self.gpu_memory_bytes

    def to_dict(self) -> dict:
        """`per_rank`: the most loaded rank; `memory_plan`: the layout and every pp rank."""
        layout = {k: v for k, v in asdict(self).items() if k != "ranks"}
        layout["tokens_per_microbatch"] = self.tokens_per_microbatch
        layout["world_size"] = self.pp * self.dp
        layout["ranks"] = [r.to_dict() for r in self.ranks]
        per_rank = self.most_loaded.to_dict()
        per_rank["gpu_memory_bytes"] = self.gpu_memory_bytes
        per_rank["fits"] = self.fits
        return {"per_rank": per_rank, "memory_plan": layout}


def plan_memory(cfg: TrainConfig) -> MemoryPlan:
    """The per-rank memory plan of `cfg` (see the module docstring). Raises ConfigError naming the field
    when the layout cannot be planned (layers_per_stage, the schedule's micro-batch count, ...)."""
    par, model, precision = cfg.parallel, cfg.model, cfg.precision
    topo = Topology.for_schedule(par.schedule, par.pp, par.dp, par.ep, model.num_nextn_predict_layers > 0)
    specs = split_layers(model.num_hidden_layers, topo.num_stages, par.layers_per_stage)
    rows = cfg.data.global_batch // (par.dp * par.microbatches)
    tokens = rows * model.seq_len

    single = par.schedule == "single"
    deepspeed = not single and par.zero_stage > 0
    moment = _DTYPE_BYTES[precision.adam_moments_dtype]
    opt_per_param = FP32_BYTES + 2 * moment if deepspeed else 2 * moment  # + FP32 master partition

    placed = []
    for pp_rank in range(par.pp):
        stages = topo.stages_of(pp_rank)
        rank = topo.rank_of(pp_rank, 0)
        shard, expert_shard = len(topo.shard_group(rank)), len(topo.expert_shard_group(rank))
        params, experts = rank_param_counts(model, [specs[s] for s in stages], par.ep)
        chunks = [tokens * stage_activation_bytes(model, precision, specs[s]) for s in stages]
        placed.append((pp_rank, stages, shard, expert_shard, params, experts, chunks))
    peaks = _peak_live(par.schedule, par.pp, par.microbatches, [p[-1] for p in placed])

    ranks = []
    for (pp_rank, stages, shard, expert_shard, params, experts, chunks), peak in zip(placed, peaks):
        dense = params - experts
        partitioned = -(-dense // shard) + -(-experts // expert_shard)  # DeepSpeed pads to whole shares
        held = partitioned if par.zero_stage == 3 and deepspeed else params
        activations, live, most, claimed = peak
        ranks.append(
            RankPlan(
                pp_rank=pp_rank,
                stages=tuple(stages),
                layers=tuple(sorted({i for s in stages for i in specs[s].layers})),
                params=params,
                expert_params=experts,
                params_bytes=FP32_BYTES * held,
                grads_bytes=FP32_BYTES * held,
                optimizer_bytes=opt_per_param * (partitioned if deepspeed else params),
                activations_bytes=activations,
                activation_bytes_per_microbatch=tuple(chunks),
                peak_live_by_chunk=live,
                peak_live_activations=most,
                claimed_peak_activations=claimed,
                largest_tensor=rank_largest_tensor(model, [specs[s] for s in stages]),
            )
        )
    rank0 = topo.rank_of(0, 0)
    return MemoryPlan(
        schedule=par.schedule,
        pp=par.pp,
        dp=par.dp,
        ep=par.ep,
        zero_stage=par.zero_stage,
        precision=precision.name,
        microbatches=par.microbatches,
        rows_per_microbatch=rows,
        seq_len=model.seq_len,
        shard_group_size=len(topo.shard_group(rank0)),
        expert_shard_group_size=len(topo.expert_shard_group(rank0)),
        weight_bytes_per_param=FP32_BYTES,
        grad_bytes_per_param=FP32_BYTES,
        optimizer_bytes_per_param=opt_per_param,
        optimizer_partitioned=deepspeed,
        gpu_memory_bytes=round(cfg.resources.gpu_memory_gb * 1e9),
        ranks=tuple(ranks),
    )


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def _gb(n: float) -> str:
    """Decimal units, as resources.gpu_memory_gb: 120.67 GB, 38.01 MB."""
    for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def _count(n: int, noun: str, plural: str = "s") -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else plural)


def _ranges(ids: Sequence[int]) -> str:
    """[0, 1, 2, 59, 60] -> '0-2, 59-60'."""
    out, start = [], None
    for i, x in enumerate(ids):
        if start is None:
            start = x
        if i + 1 == len(ids) or ids[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out) or "none"


def _totals_by_rank(ranks: Sequence[RankPlan]) -> str:
    """'0, 15: 90.27 GB; 1-14: 120.67 GB': pp ranks with equal totals (a DualPipe pair, the middle)."""
    by_total: dict[int, list[int]] = {}
    for r in ranks:
        by_total.setdefault(r.total_bytes, []).append(r.pp_rank)
    return "; ".join(f"{_ranges(ids)}: {_gb(total)}" for total, ids in by_total.items())


def format_plan(plan: MemoryPlan) -> str:
    """The plan as an aligned section: the layout, the most loaded rank's bytes, every rank's total."""
    top = plan.most_loaded
    zero = "no ZeRO (single process)" if plan.schedule == "single" else f"ZeRO-{plan.zero_stage}"
    moments = (plan.optimizer_bytes_per_param - (FP32_BYTES if plan.optimizer_partitioned else 0)) // 2
    moment_name = {2: "BF16", 4: "FP32"}[moments]
    if plan.optimizer_partitioned:
        optimizer = (
            f"{_gb(top.optimizer_bytes)}  (FP32 master + {moment_name} AdamW m, v: "
            f"{plan.optimizer_bytes_per_param} B / param over the shard group)"
        )
    else:
        optimizer = f"{_gb(top.optimizer_bytes)}  ({moment_name} AdamW m, v: {plan.optimizer_bytes_per_param} B / param)"
    live = ", ".join(
        f"{n} x stage {s} ({_gb(b)})"
        for n, s, b in zip(top.peak_live_by_chunk, top.stages, top.activation_bytes_per_microbatch)
        if n
    )
    if plan.fits is None:
        verdict = "(resources.gpu_memory_gb unknown)"
    elif plan.fits:
        verdict = (
            f"of {_gb(plan.gpu_memory_bytes)}: fits ({_gb(plan.gpu_memory_bytes - top.total_bytes)} left)"
        )
    else:
        verdict = (
            f"of {_gb(plan.gpu_memory_bytes)}: does NOT fit "
            f"(over by {_gb(top.total_bytes - plan.gpu_memory_bytes)})"
        )
    rows = [
        (
            "memory plan",
            (
                f"{plan.schedule}, pp={plan.pp} x dp={plan.dp} ({_count(plan.pp * plan.dp, 'rank')}), "
                f"ep={plan.ep}, {zero}, precision {plan.precision}"
            ),
        ),
        (
            "micro-batches",
            (
                f"{plan.microbatches} per step x {_count(plan.rows_per_microbatch, 'row')} x "
                f"{plan.seq_len:,} tokens = {plan.tokens_per_microbatch:,} tokens"
            ),
        ),
        (
            "shard groups",
            f"{_count(plan.shard_group_size, 'rank')} (dense parameters), {plan.expert_shard_group_size} (routed experts)",
        ),
        (
            "most loaded rank",
            f"pp_rank {top.pp_rank}: stages {', '.join(map(str, top.stages))}; layers {_ranges(top.layers)}",
        ),
        (
            "  parameters",
            f"{_gb(top.params_bytes)}  ({top.params:,} x {plan.weight_bytes_per_param} B, FP32)",
        ),
        ("  gradients", f"{_gb(top.grads_bytes)}  (FP32, full size until the step)"),
        ("  optimizer states", optimizer),
        (
            "  activations",
            f"{_gb(top.activations_bytes)}  (peak of {_count(sum(top.peak_live_by_chunk), 'live micro-batch', 'es')}: {live})",
        ),
        ("  total", f"{_gb(top.total_bytes)}  {verdict}"),
        ("total by pp_rank", _totals_by_rank(plan.ranks)),
        (
            "loading init.from",
            (
                f"host memory per rank at most {_gb(max(r.load_bytes for r in plan.ranks))}: its parameters "
                f"(FP32; on a GPU in device memory) + the largest tensor it reads "
                f"({_gb(FP32_BYTES * max(r.largest_tensor for r in plan.ranks))} at FP32) + "
                f"{LOAD_OVERHEAD_BYTES >> 20} MiB"
            ),
        ),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)
