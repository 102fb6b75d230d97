"""The ZeRO optimizer step of a pipeline rank (DeepSpeed): gradient reduction, global-norm clipping,
AdamW, with optimizer state partitioned over the shard group (gradients too, but see "What ZeRO-2
saves here" below: no more than ZeRO-1 in this design).

Input, once per step: this rank's gradients (a dict id(param) -> tensor, summed over the micro-batches
it computed, each loss scaled by dp * n_m / N, its share of the step's trained labels times dp:
`platform.data.microbatches.microbatch_inputs`). The step must apply the gradient the single-process reference
would: summed over the two ranks of a DualPipe pair (each computed half the micro-batches of each
stage), averaged over dp replicas, clipped by the norm over ALL stages, then AdamW.

Two implementations, same interface (`step(grads, lr) -> grad_norm`), this one and
`platform.optim.plain_step.PlainStep`:

- `ZeroStep` (parallel.zero_stage 1 or 2): a DeepSpeed engine per rank, over the rank's `RankModule`,
  with the *shard group* as DeepSpeed's data-parallel group (dp replicas x the DualPipe pair: all hold
  identical parameters, so optimizer state is partitioned over all of them). NOT DeepSpeed's pipeline
  engine: the executor runs the schedule; DeepSpeed sees one backward per step. That backward is a
  surrogate `sum(p * g)` whose gradient w.r.t. p is exactly the accumulated g, so DeepSpeed's own
  hooks reduce (average over the group) and partition it; multiplying g by `param_copies` first turns
  the average over a DualPipe pair into the sum the math needs. The executor computes weight
  gradients with torch.autograd.grad into its own buffers, so DeepSpeed's per-parameter hooks never
  fire mid-schedule, when the ranks of a group are at different actions.
  Global-norm clipping stays DeepSpeed's (`gradient_clipping` = optim.grad_clip): given an `mpu`
  whose model-parallel group is the topology's *norm group* (one rank per distinct shard group) and
  every parameter marked `model_parallel`, DeepSpeed adds the squared norms of all stages; the
  last stage's copy of a tied embedding is marked `ds_pipe_replicated` so it is counted once. Same
  arithmetic as the reference's clip (coef = max_norm / (norm + 1e-6), capped at 1).
- `PlainStep` (parallel.zero_stage 0, `platform.optim.plain_step`): one flat all-reduce over the
  shard group, the reference's `grad_sq_sum` all-reduced over the norm group, the reference's clip
  and a torch AdamW.

What ZeRO-2 saves here: nothing over ZeRO-1. Measured by
`tests.test_zero_partition.test_zero2_partitions_no_more_gradient_than_zero1_here` (DualPipe pp=2, tiny
model, shard group of 2, 9.50 MB of fp32 gradients per rank), DeepSpeed 0.19's
`deepspeed.runtime.zero.stage_1_and_2` read alongside:
- The stages differ only in WHEN DeepSpeed reduces. ZeRO-2 reduces an IPG bucket as soon as it fills
  (reduce_bucket_size: parallel.zero_bucket_elements) during the backward and drops other ranks' parts;
  ZeRO-1 reduces at the gradient-accumulation boundary. With gradient_accumulation_steps=1 every
  backward is a boundary, so both reduce at the end of the one surrogate backward and keep for
  step() only `averaged_gradients`: views into `grads_in_partition`, the parameters overlapping this
  rank's partition. Measured at engine.step(): 4.99 MB and 4.78 MB on the two ranks (the exact half is
  4.75 MB; a parameter straddling the edge is held whole), the same bytes under ZeRO-1 and ZeRO-2.
- When DeepSpeed's reduction begins it holds the whole gradient (9.50 MB) under both stages: the
  surrogate hands over every parameter's gradient in one backward, and the tiny model fits in one
  bucket. On a model larger than a bucket ZeRO-2 would reduce during the backward, but the peak is
  set before that: the executor accumulates full-size gradients of every parameter from the
  schedule's first W until the step (its own buffers, so the ranks of a group can be at different
  actions), so peak gradient memory is the full size under either stage.
- Our own full-size buffers: `step` consumes the dict, so each gradient lives on only in the
  surrogate's graph, which the backward frees parameter by parameter as DeepSpeed takes it over
  (measured alive at engine.step(): 0 bytes; 9.50 MB before `step` consumed the dict, and for a
  DualPipe pair a second full copy `g * param_copies` during the backward).
So a rank holds, at the optimizer step, 1/shard of its gradient (+ edge parameters) under ZeRO-1 and
ZeRO-2 alike, and at its peak the full gradient under both; what partitioning really saves is the
fp32 master and the AdamW moments (1/shard under both stages). ZeRO-2 could lower the peak only if
the executor handed each parameter's gradient over as soon as its last W is done (a reduction per
finished parameter group, in schedule order on every rank of the group), which it does not. Also
note that DeepSpeed allocates each IPG bucket at reduce_bucket_size under both stages: the CPU
commits only the pages written, a GPU commits all of it.

Device and buckets. The engine is built on the device the rank's module is already on, and DeepSpeed
is told not to move it (`dont_change_device`; DeepSpeed 0.19 takes it only as an argument of its
engine, which `deepspeed.initialize` neither accepts nor passes on, so `_build_engine` builds the
engine as `initialize` does for a plain module). ZeRO still allocates its flat buffers on the
accelerator's current device and the engine takes its device from LOCAL_RANK, so both must be the
module's device (`platform.launch.accelerator.bind_device`); `ZeroStep` refuses to start when
they are not. The reduce and all-gather buckets are `parallel.zero_bucket_elements` (5e7 by default,
Megatron-DeepSpeed's practice) instead of DeepSpeed's 5e8: a 5e8-element fp32 IPG bucket is 2 GB of
GPU memory per bucket, committed whether the gradients fill it or not.

Expert parallelism: DeepSpeed's own MoE mechanism, fed our groups. DeepSpeed expresses MoE state
as (a) expert parameters marked `allreduce = False` with a `group_name`, (b) optimizer parameter
groups split by `deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer` into
groups flagged `moe: True` with that name, and (c) process groups registered under the name in
`deepspeed.utils.groups` (expert-parallel and expert-data-parallel). Its ZeRO-1/2 optimizer then
partitions each expert group over the expert-data-parallel group, reduces expert gradients over it
after dividing the whole bucket by the data-parallel (shard) group size, which is the arithmetic we
need (an expert gradient already sums the tokens of its EP group, see `plain_step.PlainStep`), and adds the
expert partitions' norms into the global norm. Where it does not fit, and why:
- (c) DeepSpeed builds its groups itself (`groups._create_expert_and_data_parallel`) from a rank
  layout of its own (experts over consecutive ranks of one data-parallel world); ours come from
  the topology (a DualPipe pair x dp replicas, EP blocks inside them), so we register our handles
  in its group dictionaries, which are module globals without a public setter.
- DeepSpeed only switches its ZeRO optimizer to the MoE path when the model contains an instance of
  its own `deepspeed.moe.layer.MoE` (that class holds its gate and experts; ours are the model's).
  The engine therefore wraps the rank's module together with a parameter-less marker instance of
  that class (`_MoEMarker`), used for nothing but that check.
Both touch DeepSpeed internals (checked against 0.19);
`tests.test_ep_parity.test_expert_parallel_run_matches_reference`'s ZeRO-1 case holds the result to the
reference, so a DeepSpeed change that breaks them fails there.

Checkpoints: `state(layout)` returns the optimizer as a Stateful of per-parameter tensors keyed by
name, the same keys whoever wrote them, so any layout reads them
(`platform.checkpoint.reshard.CheckpointReader`). PlainStep: AdamW moments by parameter name
(`OptimizerState`). ZeroStep: `ZeroOptimizerState`, this rank's partition of DeepSpeed's ZeRO state cut
into per-parameter pieces (no pickle; DeepSpeed's own `state_dict()` mixes in Python objects and is tied
to one partitioning).
"""

from __future__ import annotations

import math

import torch
from moeforge.platform.checkpoint.pieces import ShardedTensor
from moeforge.platform.checkpoint.state import CheckpointError
from moeforge.platform.config.optim import OptimConfig
from moeforge.platform.config.parallel import ZERO_BUCKET_ELEMENTS
from moeforge.platform.config.precision import PrecisionConfig
from moeforge.platform.engine.topology import ProcessGroups
from moeforge.platform.optim.adamw import build_adamw
from moeforge.platform.optim.lr_schedule import set_lr
from torch import nn


class _GroupsMPU:
    """The `mpu` interface DeepSpeed queries: data parallel = shard group, model parallel = norm group."""

    def __init__(self, groups: ProcessGroups, rank: int) -> None:
        self.g, self.rank = groups, rank

    def get_data_parallel_group(self):
        return self.g.shard

    def get_data_parallel_rank(self) -> int:
        return self.g.ranks["shard"].index(self.rank)

    def get_data_parallel_world_size(self) -> int:
        return len(self.g.ranks["shard"])

    def get_model_parallel_group(self):
        return self.g.norm

    def get_model_parallel_rank(self) -> int:
        return self.g.ranks["norm"].index(self.rank)

    def get_model_parallel_world_size(self) -> int:
        return len(self.g.ranks["norm"])


def deepspeed_config(zero_stage: int, grad_clip: float, bucket_elements: int = ZERO_BUCKET_ELEMENTS) -> dict:
    """DeepSpeed config for one pipeline rank. gradient_accumulation_steps is 1: the executor has
    already accumulated the step's micro-batches; clipping is explicit (DeepSpeed's default clips);
    the reduce and all-gather buckets hold `bucket_elements` elements each (DeepSpeed's default,
    5e8, commits 2 GB of fp32 per bucket on a GPU)."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(grad_clip),
        "zero_optimization": {
            "stage": zero_stage,
            "reduce_bucket_size": int(bucket_elements),
            "allgather_bucket_size": int(bucket_elements),
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


EXPERT_GROUP_NAME = "moeforge_ep"  # DeepSpeed's name of our experts' parameter and process groups


def _register_expert_groups(groups: ProcessGroups) -> None:
    """Put our EP and expert-shard groups where DeepSpeed's ZeRO optimizer looks for them."""
    from deepspeed.utils import groups as ds_groups

    ds_groups._EXPERT_PARALLEL_GROUP[EXPERT_GROUP_NAME] = groups.ep
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[EXPERT_GROUP_NAME] = groups.ranks["ep"]
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[EXPERT_GROUP_NAME] = groups.expert_shard
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[EXPERT_GROUP_NAME] = groups.ranks["expert_shard"]


def _with_moe_marker(module: nn.Module, groups: ProcessGroups) -> nn.Module:
    """`module` beside a parameter-less `deepspeed.moe.layer.MoE`, so DeepSpeed takes its MoE path."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    marker = DeepSpeedMoE.__new__(DeepSpeedMoE)  # no gate, no experts: never called
    nn.Module.__init__(marker)
    # the attributes DeepSpeed's engine reads from its MoE layers
    marker.ep_size = len(groups.ranks["ep"])
    marker.expert_group_name = EXPERT_GROUP_NAME
    marker.num_experts = marker.num_local_experts = 0
    # The engine asks each MoE layer to create (or look up) its groups; ours are registered already.
    marker.set_deepspeed_parallelism = lambda *args, **kwargs: None
    wrapper = nn.Module()
    wrapper.rank_module = module
    wrapper.moe_marker = marker
    return wrapper


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.type == "cpu" or a.index == b.index)


def _check_one_device(device: torch.device) -> None:
    """Refuse to build an engine whose device (LOCAL_RANK) or ZeRO buffers (the current device)
    would not be `device`, the module's: DeepSpeed would copy the parameters over silently."""
    from moeforge.platform.launch.accelerator import deepspeed_devices

    engine, buffers = deepspeed_devices()
    if not (_same_device(engine, device) and _same_device(buffers, device)):
        raise RuntimeError(
            f"DeepSpeed would put this rank's engine on {engine} (LOCAL_RANK) and ZeRO's buffers on "
            f"{buffers} (the current device), but its module is on {device}: bind the worker's device "
            "first (moeforge.platform.launch.accelerator.bind_device)"
        )


def _build_engine(model: nn.Module, optimizer, config: dict, mpu):
    """`deepspeed.initialize(model=, optimizer=, config=, mpu=, dist_init_required=False)` for a
    plain module, with `dont_change_device=True`, which DeepSpeed 0.19 takes only as an argument of
    its engine. What `initialize` does besides building the engine does not apply here: a pipeline
    module, the hybrid engine, AutoTP, Muon's parameter flags, a zero.Init context, a mesh."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.engine import DeepSpeedEngine
    from moeforge.platform.launch.accelerator import init_deepspeed_comm

    init_deepspeed_comm()
    engine = DeepSpeedEngine(
        args=None,
        model=model,
        optimizer=optimizer,
        mpu=mpu,
        dist_init_required=False,
        config=config,
        config_class=DeepSpeedConfig(config, mpu),
        dont_change_device=True,
    )
    return engine, engine.optimizer


class ZeroStep:
    """DeepSpeed ZeRO-1/2 over the rank's parameters (see module docstring), on the device the
    module is on; `bucket_elements` sizes ZeRO's reduce and all-gather buckets."""

    def __init__(
        self,
        module: nn.Module,
        optim_cfg: OptimConfig,
        precision_cfg: PrecisionConfig,
        groups: ProcessGroups,
        rank: int,
        zero_stage: int,
        param_copies: int,
        replicated: list[nn.Parameter],
        expert_params: list[nn.Parameter] = (),
        bucket_elements: int = ZERO_BUCKET_ELEMENTS,
    ) -> None:
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        if zero_stage not in (1, 2):
            raise ValueError(f"parallel.zero_stage: ZeroStep runs stage 1 or 2, got {zero_stage}")
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.device = self.params[0].device
        _check_one_device(self.device)
        self.named_params = list(module.named_parameters())
        for p in self.params:
            p.model_parallel = True  # every norm-group rank holds distinct parameters: count them all
        for p in replicated:
            p.ds_pipe_replicated = True  # a copy of a parameter another rank also counts
        self.copies = param_copies
        split = None
        engine_module = module
        if expert_params:
            for p in expert_params:
                p.allreduce = False  # DeepSpeed's mark of an expert parameter
                p.group_name = EXPERT_GROUP_NAME
            _register_expert_groups(groups)
            split = split_params_into_different_moe_groups_for_optimizer
            engine_module = _with_moe_marker(module, groups)
        optimizer = build_adamw(module.named_parameters(), optim_cfg, precision_cfg, split_groups=split)
        self.engine, self.optimizer = _build_engine(
            engine_module,
            optimizer,
            deepspeed_config(zero_stage, optim_cfg.grad_clip, bucket_elements),
            _GroupsMPU(groups, rank),
        )

    def step(self, grads: dict[int, torch.Tensor], lr: float) -> float:
        """Reduce, clip and apply `grads`, which this CONSUMES (the dict is emptied): each full-size
        gradient then lives only in the surrogate's graph, which the backward frees parameter by
        parameter as DeepSpeed takes the gradients over, so none of ours is left when DeepSpeed's
        optimizer step runs (see the module docstring: what ZeRO-2 does and does not save)."""
        surrogate, g = torch.zeros((), device=self.device), None
        for p in self.params:
            g = grads.pop(id(p), None)
            if g is None:
                # A parameter this rank never touched this step still takes part (zero gradient):
                # the group's reduction must see the same parameters on every member.
                g = torch.zeros_like(p)
            elif self.copies != 1:
                g = g * self.copies  # the popped original is freed here: one full copy at a time
            surrogate = surrogate + (p * g).sum()
        del g  # the loop variable would otherwise keep the last gradient alive through the step
        self.engine.backward(surrogate)
        set_lr(self.optimizer, lr)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else math.nan

    def state(self, layout=None) -> ZeroOptimizerState:
        """The optimizer state to checkpoint: this rank's ZeRO partition, as pieces of each
        parameter's AdamW state by name (`layout`: where each parameter sits in the whole model)."""
        return ZeroOptimizerState(self.optimizer, self.named_params, layout)


class ZeroOptimizerState:
    """This rank's DeepSpeed ZeRO-1/2 optimizer state as pieces of per-parameter tensors, so any
    layout (another dp, pp or ep, no ZeRO, the single-process loop) can read it back.

    DeepSpeed keeps, per parameter group g, one flat buffer of the group's parameters (each
    parameter's `.data` is a view into it, with alignment padding between them) and gives this rank
    one contiguous partition of it: the fp32 master partition and the wrapped AdamW's moments on
    it. The partition cuts each parameter it overlaps into one flat run, saved as
    `<name>/exp_avg` (a `ShardedTensor` at the parameter's place in the whole model: its `layout`
    offset plus the run's start inside the parameter), `<name>/exp_avg_sq`, and the scalar
    `<name>/step`: the keys `OptimizerState` writes for an unsharded AdamW.

    The fp32 master is not saved: with fp32 parameters (moeforge trains fp32 masters; precision is
    applied in the compute) DeepSpeed copies the master into the parameters after every step, so
    the two are equal, and a load rebuilds the master partition from the loaded parameters."""

    def __init__(self, zero_optimizer, named_params, layout=None) -> None:
        self.zero = zero_optimizer
        self.names = {id(p): n for n, p in named_params}
        self.params = {n: p for n, p in named_params}
        self.layout = layout

    def _runs(self):
        """Per group: (fp32 partition, its start in the flat buffer, [(name, param offset in the
        flat buffer, first, stop)]) for every parameter run inside this rank's partition."""
        import torch.distributed as dist

        zero = self.zero
        for g, fp32 in enumerate(zero.single_partition_of_fp32_groups):
            flat = zero.bit16_groups_flat[g]
            size = flat.element_size()
            partition = zero.parallel_partitioned_bit16_groups[g][
                dist.get_rank(group=zero.real_dp_process_group[g])
            ]
            start = (partition.data_ptr() - flat.data_ptr()) // size
            stop = start + partition.numel()
            runs = []
            for param in zero.bit16_groups[g]:
                offset = (param.data_ptr() - flat.data_ptr()) // size
                first, last = max(offset, start), min(offset + param.numel(), stop)
                if first < last:
                    runs.append((self.names[id(param)], offset, first, last))
            yield fp32, flat, start, runs

    def _place(self, name: str) -> tuple[tuple[int, ...], int]:
        if self.layout is not None:
            return self.layout[name]
        return tuple(self.params[name].shape), 0

    def state_dict(self) -> dict[str, torch.Tensor | ShardedTensor]:
        out: dict[str, torch.Tensor | ShardedTensor] = {}
        for fp32, _flat, start, runs in self._runs():
            state = self.zero.optimizer.state.get(fp32, {})
            for name, offset, first, last in runs:
                shape, place = self._place(name)
                for key, value in state.items():
                    if isinstance(value, (int, float)):
                        value = torch.tensor(float(value), dtype=torch.float32)
                    if value.ndim == 0:
                        out[f"{name}/{key}"] = value.detach().cpu().clone()
                    else:
                        run = value[first - start : last - start].detach().cpu().clone()
                        out[f"{name}/{key}"] = ShardedTensor(run, shape, place + first - offset)
        return out

    def load_from(self, reader) -> None:
        """The partition from a `CheckpointReader`: call after the model's parameters are loaded
        (the master partition is copied from them)."""
        for fp32, flat, start, runs in self._runs():
            with torch.no_grad():
                fp32.copy_(flat[start : start + fp32.numel()].to(fp32.dtype))
            state: dict[str, torch.Tensor] = {}
            for name, offset, first, last in runs:
                shape, place = self._place(name)
                for state_key in reader.state_keys(name):
                    key = f"optimizer/{name}/{state_key}"
                    saved = reader.global_shape(key)
                    if len(saved) == 0:
                        state[state_key] = reader.read_whole(key).clone()
                        continue
                    if tuple(saved) != tuple(shape):
                        raise CheckpointError(
                            f"{reader.meta.path}: {key}: checkpoint shape {list(saved)} != parameter "
                            f"shape {list(shape)}"
                        )
                    values = reader.read(key, place + first - offset, place + last - offset)
                    if state_key not in state:
                        state[state_key] = torch.zeros(fp32.numel(), dtype=values.dtype)
                    state[state_key][first - start : last - start] = values
            if state:
                self.zero.optimizer.state[fp32] = {
                    k: (v.to(fp32.device) if v.ndim > 0 else v) for k, v in state.items()
                }
