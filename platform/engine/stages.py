"""A rank's pipeline stages: which layers each holds, the part of the model one rank builds, and
their forward and split backward (`ModelCompute`, which the executor drives).

Stage s of S holds main-model blocks `layers[start:end]`; stage 0 also holds the embedding and
stage S-1 the final norm, the head and the MTP modules (which also need the embedding: on a rank that
holds both ends it is the same Parameter, otherwise the last stage holds a copy whose gradient the
runtime sums with the first stage's, see topology.tie_group).

The model code is used unchanged: a stage calls `model.embed_tokens`, the blocks and
`model.head_and_loss` of a Transformer built on the meta device, of which only the modules this rank
needs are materialised. Each tensor is initialised from (seed, parameter name) by
`model.init.init_weights`, so a rank's weights equal the single-process model's weights of the same
names.

B / W split. With the precision policy applied (`platform.precision.apply_precision`: every attention /
MLP / expert GEMM is a DeferrableLinear, FP8Linear or GroupedSwiGLUExperts), B runs the stage's
backward inside a `WeightGradStore.defer()` block: those layers return their input gradient at once
and queue their weight-gradient GEMM; every other parameter (norms, embedding, head, router) gets its
gradient in B.
W pops the queued GEMMs (one store per (chunk, micro-batch)), which accumulate into `param.grad`.
Without such layers (`deferred_wgrad=False`) B takes the input gradient with the graph retained and
W the parameter gradients through the same graph, which re-traverses it (correct, not cheaper).

Gradients never flow through autograd's own accumulation into `.grad` during the step:
`torch.autograd.grad` returns them into `ModelCompute`'s buffers, and `take_grads` also collects
what the W closures wrote into `.grad`; so no per-parameter hook (DeepSpeed's) fires mid-schedule,
when the ranks of a dp group are at different actions. The optimizer step (`ZeroStep`, or the plain
step without ZeRO) sees them once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from moeforge.kernels.wgrad_store import WeightGradStore
from moeforge.model.config import ModelConfig
from moeforge.model.init import init_weights
from moeforge.model.transformer import MoE, Transformer, build_model
from moeforge.platform.config.builder import ConfigError
from moeforge.platform.data.microbatches import MicroBatch
from moeforge.platform.engine.chunk_program import (
    ChunkProgram,
    ChunkRun,
    PhaseHook,
    Program,
    run_pair,
    run_to_end,
)
from moeforge.platform.moe.dispatch import CollectiveTracker
from moeforge.platform.moe.expert_placement import ExpertPlacement
from moeforge.platform.moe.install import shard_experts
from torch import nn


@dataclass(frozen=True)
class StageSpec:
    """What model stage `stage` computes: main-model blocks `layers`, plus the embedding (`first`)
    and/or the final norm + head + MTP chain with the loss (`last`)."""

    stage: int
    layers: range
    first: bool
    last: bool


def split_layers(
    num_layers: int, num_stages: int, layers_per_stage: Sequence[int] | None = None
) -> list[StageSpec]:
    """Contiguous layer ranges for `num_stages` stages: even (num_layers divisible by num_stages) or
    the explicit `layers_per_stage` counts (summing to num_layers; a count may be 0)."""
    if num_stages < 1:
        raise ConfigError(f"parallel: a pipeline needs >= 1 stage, got {num_stages}")
    if layers_per_stage is None:
        if num_layers % num_stages:
            raise ConfigError(
                f"model.num_hidden_layers ({num_layers}) is not divisible by the {num_stages} pipeline "
                f"stages the schedule needs; set parallel.layers_per_stage to an explicit split"
            )
        counts = [num_layers // num_stages] * num_stages
    else:
        counts = list(layers_per_stage)
        if len(counts) != num_stages:
            raise ConfigError(
                f"parallel.layers_per_stage: needs {num_stages} entries (one per stage), got {len(counts)}"
            )
        if any((not isinstance(c, int)) or c < 0 for c in counts):
            raise ConfigError(f"parallel.layers_per_stage: entries must be integers >= 0, got {counts}")
        if sum(counts) != num_layers:
            raise ConfigError(
                f"parallel.layers_per_stage: sums to {sum(counts)}, model.num_hidden_layers is {num_layers}"
            )
    specs, start = [], 0
    for stage, count in enumerate(counts):
        specs.append(StageSpec(stage, range(start, start + count), stage == 0, stage == num_stages - 1))
        start += count
    return specs


class RankModule(nn.Module):
    """The modules one rank holds, under the full model's attribute names (`embed`, `layers.<i>`,
    `norm`, `head`, `mtp.<d>`), so `named_parameters()` and `state_dict()` keys equal the
    single-process model's. It only references the Transformer's own submodules."""

    def __init__(self, model: Transformer, specs: Sequence[StageSpec]) -> None:
        super().__init__()
        needs_embed = any(s.first for s in specs) or (any(s.last for s in specs) and len(model.mtp) > 0)
        if needs_embed:
            self.embed = model.embed
        # ModuleDict keyed by layer id: parameter names read "layers.3.attn...", as in nn.ModuleList.
        layer_ids = sorted({i for s in specs for i in s.layers})
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        if any(s.last for s in specs):
            self.norm = model.norm
            self.head = model.head
            self.mtp = model.mtp
        self.layer_ids = layer_ids

    def moe_layers(self) -> list[MoE]:
        """This rank's MoE modules in the full model's order (main blocks, then MTP blocks)."""
        blocks = [self.layers[str(i)] for i in self.layer_ids]
        blocks += [m.block for m in getattr(self, "mtp", [])]
        return [b.mlp for b in blocks if isinstance(b.mlp, MoE)]


class StageChunk:
    """Runs one model stage with the unchanged model code."""

    def __init__(self, model: Transformer, spec: StageSpec, rank_module: RankModule) -> None:
        self.model = model
        self.spec = spec
        self.blocks = [model.layers[i] for i in spec.layers]
        # The parameters this stage's forward touches (the MTP chain also reads the embedding).
        modules: list[nn.Module] = list(self.blocks)
        if spec.first:
            modules.append(model.embed)
        if spec.last:
            modules += [model.norm, model.head, model.mtp]
            if len(model.mtp) > 0 and not spec.first:
                modules.append(model.embed)
        mtp_blocks = [m.block for m in model.mtp] if spec.last else []
        self.moe_layers = [b.mlp for b in self.blocks + mtp_blocks if isinstance(b.mlp, MoE)]
        seen: set[int] = set()
        self.params: list[nn.Parameter] = []
        for m in modules:
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    self.params.append(p)

    def forward(
        self,
        x: torch.Tensor | None,
        input_ids: torch.Tensor | None,
        labels: torch.Tensor | None,
        mtp_loss_weight: float | None = None,
        segments: torch.Tensor | None = None,
        mtp_scales: Sequence[float] | None = None,
    ):
        """x [b, s, hidden] from the previous stage (None on the first stage) -> h [b, s, hidden],
        or on the last stage the model's LossOutput, its MTP term weighted by `mtp_loss_weight`
        (the step's scheduled lambda; None: model.mtp_loss_weight) and its depths by `mtp_scales`
        (Transformer.head_and_loss). `segments` [b, s]: the micro-batch's packed rows (None: one
        document per row), which every stage's attention reads."""
        h = self.model.embed_tokens(input_ids) if self.spec.first else x
        for block in self.blocks:
            h = block(h, segments=segments)
        if self.spec.last:
            return self.model.head_and_loss(h, input_ids, labels, mtp_loss_weight, segments, mtp_scales)
        return h


def build_rank(
    cfg: ModelConfig,
    specs: Sequence[StageSpec],
    seed: int,
    device: str | torch.device = "cpu",
    experts: ExpertPlacement | None = None,
) -> tuple[Transformer, RankModule]:
    """Build the Transformer on meta, materialise only the modules of `specs` on `device` and
    initialise them exactly as `build_model(cfg, seed=seed)` would.

    With `experts` (expert parallelism) each MoE layer holds only that placement's local experts,
    with the full model's weights of the same global indices. `device="meta"` stops before
    materialising: the memory plan counts a rank's parameters that way."""
    model = build_model(cfg, device="meta")
    rank_module = RankModule(model, specs)
    if experts is not None:
        shard_experts(rank_module.moe_layers(), experts)
    if torch.device(device).type == "meta":
        return model, rank_module
    rank_module.to_empty(device=device)
    init_weights(rank_module, cfg.initializer_range, seed)
    for moe in rank_module.moe_layers():
        moe.reset_load()
    rank_module.train()
    return model, rank_module


# ---- forward and split backward of the rank's chunks ----------------------------------------------
# A micro-batch is platform.data.microbatches.MicroBatch (input ids, labels, segments, loss factor):
# every stage reads its segments (attention and positions of packed rows), the first stage its
# input ids, the last its labels and its loss factor.


@dataclass
class _Slot:
    """Live state of one (chunk, micro-batch) between its F and its W."""

    inp: torch.Tensor | None  # stage input with requires_grad (None on the first stage)
    root: torch.Tensor | None  # what backward starts from: the stage output, or the scaled loss
    grad_out: torch.Tensor | None = None
    store: WeightGradStore | None = None  # the deferred weight-gradient GEMMs of this slot's B


class ModelCompute:
    """StageCompute over `chunks` (local chunk index -> StageChunk) for one step's micro-batches.

    Each micro-batch's loss is multiplied by its own `MicroBatch.loss_scale` before its backward
    (dp * n_m / N: the step's token mean, `platform.data.microbatches.microbatch_inputs`), or by the uniform
    `loss_scale` (1/M) for a micro-batch that carries none; its MTP term is weighted by the step's
    `mtp_loss_weight` (`start_step`). Per micro-batch loss values are kept in `losses`
    (last-stage chunks only). `context()` wraps every forward (the precision policy's autocast);
    outputs cross stages as `act_dtype`."""

    def __init__(
        self,
        chunks: dict[int, StageChunk],
        loss_scale: float,
        deferred_wgrad: bool = True,
        context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        act_dtype: torch.dtype = torch.float32,
        phases: bool = False,
        tracker: CollectiveTracker | None = None,
        overlap_order: str = "backward_first",
    ) -> None:
        self.chunks = chunks
        self.loss_scale = loss_scale
        self.deferred_wgrad = deferred_wgrad
        # parallel.chunk_phases: chunks run as phase programs (`chunk_program.ChunkProgram`), which an
        # F&B pair can interleave; otherwise each chunk is one autograd graph. `tracker` (the rank's P2P
        # endpoint) times the programs' all-to-alls.
        self.programs = (
            {c: ChunkProgram(stage, context, self._accumulate, tracker) for c, stage in chunks.items()}
            if phases
            else None
        )
        self.overlap_order = overlap_order
        self.context = context
        self.act_dtype = act_dtype
        self.microbatches: list[MicroBatch] = []
        self.mtp_loss_weight: float | None = None  # the step's scheduled lambda; None: the model's
        self.slots: dict[tuple[int, int], _Slot | ChunkRun] = {}
        # Per micro-batch loss values and the balance-loss sum stay 0-d tensors until the step's end
        # (loss_values): a float() per micro-batch would be a host synchronisation on the GPU's
        # critical path, between schedule actions.
        self.losses: dict[int, dict[str, torch.Tensor]] = {}
        self.aux_loss_sum: torch.Tensor | float = 0.0  # balance losses of this rank's MoE layers
        # Parameters shared by two chunks (the embedding on a DualPipe rank) appear once.
        seen, self.params = set(), []
        for c in sorted(chunks):
            for p in chunks[c].params:
                if id(p) not in seen:
                    seen.add(id(p))
                    self.params.append(p)
        self.param_grads: dict[int, torch.Tensor] = {}

    def start_step(self, microbatches: list[MicroBatch], mtp_loss_weight: float | None = None) -> None:
        """A new step over `microbatches`, whose losses weight MTP by `mtp_loss_weight` (the step's
        scheduled lambda, `platform.optim.recipe_schedule.recipe_at`; None: model.mtp_loss_weight)."""
        if self.slots:
            raise RuntimeError(f"{len(self.slots)} micro-batch states left over from the previous step")
        self.microbatches = microbatches
        self.mtp_loss_weight = mtp_loss_weight
        self.losses = {}
        self.aux_loss_sum = 0.0

    def loss_values(self) -> tuple[dict[int, dict[str, float]], float]:
        """The step's per micro-batch losses and balance-loss sum as floats: one host read of one
        stacked tensor, after the schedule."""
        keys = [(mb, k) for mb, vals in sorted(self.losses.items()) for k in vals]
        values = [torch.as_tensor(self.losses[mb][k]) for mb, k in keys] + [torch.as_tensor(self.aux_loss_sum)]
        device = next((v.device for v in values if v.device.type != "cpu"), torch.device("cpu"))
        read = torch.stack([v.float().reshape(()).to(device) for v in values]).tolist()
        losses: dict[int, dict[str, float]] = {}
        for (mb, k), value in zip(keys, read, strict=False):
            losses.setdefault(mb, {})[k] = value
        return losses, read[-1]

    def take_grads(self) -> dict[int, torch.Tensor]:
        """The step's accumulated weight gradients, keyed by id(param) (including what deferred W
        steps wrote into `.grad`, which is cleared); resets the buffers."""
        if self.slots:
            raise RuntimeError(f"{len(self.slots)} micro-batches still wait for their backward or W")
        for p in self.params:
            if p.grad is not None:
                self._accumulate([p], [p.grad])
                p.grad = None
        grads, self.param_grads = self.param_grads, {}
        return grads

    # ---- phase programs (parallel.chunk_phases) ------------------------------------------------------
    def forward_program(self, chunk: int, mb: int, x: torch.Tensor | None) -> Program:
        """The forward of (chunk, mb) as a phase program; its result is what `forward` returns."""
        stage = self.chunks[chunk]
        batch = self.microbatches[mb]
        run = ChunkRun()
        scale = self._loss_scale(batch)
        out = yield from self.programs[chunk].forward(run, x, batch, scale, self.mtp_loss_weight)
        self._record_forward(stage, mb, run.loss)
        self.slots[(chunk, mb)] = run
        run.loss = None  # the last phase holds the scaled loss as its root
        return None if stage.spec.last else out.to(self.act_dtype)

    def backward_program(self, chunk: int, mb: int, grad_out: torch.Tensor | None, full: bool) -> Program:
        """The input-gradient backward of (chunk, mb) as a phase program (with `full`, its weight
        gradients too); its result is the gradient of the chunk input."""
        run = self.slots[(chunk, mb)]
        grad_in = yield from self.programs[chunk].backward(run, grad_out)
        if full:
            self.slots.pop((chunk, mb)).store.flush()
        return grad_in

    def overlapped_pair(
        self,
        f: tuple[int, int, torch.Tensor | None],
        b: tuple[int, int, torch.Tensor | None],
        full: bool,
        on_forward_done: Callable[[torch.Tensor | None], None],
        on_phase: PhaseHook | None = None,
        now: Callable[[], object] = time.perf_counter,
    ) -> torch.Tensor | None:
        """An F&B pair with its phases interleaved (parallel.overlap); returns the backward's input
        gradient. `on_forward_done` receives the forward's output as soon as it exists; `on_phase`
        each phase's span as marks of `now` (chunk_program.run_pair)."""
        programs = self.forward_program(*f), self.backward_program(*b, full)
        _, grad_in = run_pair(*programs, on_forward_done, self.overlap_order, on_phase, now)
        return grad_in

    # ---- StageCompute -----------------------------------------------------------------------------
    def forward(self, chunk: int, mb: int, x: torch.Tensor | None) -> torch.Tensor | None:
        if self.programs is not None:
            return run_to_end(self.forward_program(chunk, mb, x))
        stage = self.chunks[chunk]
        batch = self.microbatches[mb]
        inp = None if stage.spec.first else x.detach().requires_grad_(True)
        with self.context():
            out = stage.forward(
                inp, batch.input_ids, batch.labels, self.mtp_loss_weight, batch.segments, batch.mtp_scales
            )
        self._record_forward(stage, mb, out if stage.spec.last else None)
        if stage.spec.last:
            self.slots[(chunk, mb)] = _Slot(inp, out.loss * self._loss_scale(batch))
            return None
        self.slots[(chunk, mb)] = _Slot(inp, out)
        return out.detach().to(self.act_dtype)

    def _loss_scale(self, batch: MicroBatch) -> float:
        return self.loss_scale if batch.loss_scale is None else batch.loss_scale

    def _record_forward(self, stage: StageChunk, mb: int, loss) -> None:
        """After a forward: the balance losses its MoE layers recorded, and on the last stage the
        micro-batch's loss values (`loss`, a LossOutput; None elsewhere)."""
        for moe in stage.moe_layers:
            if moe.last_aux_loss is not None:
                self.aux_loss_sum = self.aux_loss_sum + moe.last_aux_loss.detach()
        if loss is not None:
            self.losses[mb] = {
                "loss": loss.loss.detach(),
                "lm_loss": loss.lm_loss.detach(),
                "mtp_loss": loss.mtp_loss.detach(),
            }

    def backward_input(self, chunk: int, mb: int, grad_out: torch.Tensor | None) -> torch.Tensor | None:
        if self.programs is not None:
            return run_to_end(self.backward_program(chunk, mb, grad_out, full=False))
        slot = self.slots[(chunk, mb)]
        if not self.deferred_wgrad:
            slot.grad_out = grad_out
            if slot.inp is None:
                return None  # first stage: no input gradient to pass on; W does the whole backward
            (grad_in,) = torch.autograd.grad(slot.root, [slot.inp], grad_out, retain_graph=True)
            return grad_in
        params = self.chunks[chunk].params
        inputs = params if slot.inp is None else [slot.inp, *params]
        slot.store = WeightGradStore()
        with slot.store.defer():  # deferrable GEMMs queue their weight gradients here
            grads = torch.autograd.grad(slot.root, inputs, grad_out, allow_unused=True)
        slot.root = None  # the graph is freed; W needs only the queued (input, grad) pairs
        return self._split_grads(slot, params, grads)

    def backward_weight(self, chunk: int, mb: int) -> None:
        slot = self.slots.pop((chunk, mb))
        if isinstance(slot, ChunkRun):
            slot.store.flush()  # one queued batch per backward phase
            return
        if slot.store is not None:
            slot.store.pop()  # accumulates into param.grad; collected by take_grads
            return
        params = self.chunks[chunk].params
        grads = torch.autograd.grad(slot.root, params, slot.grad_out, allow_unused=True)
        self._accumulate(params, grads)

    def backward_full(self, chunk: int, mb: int, grad_out: torch.Tensor | None) -> torch.Tensor | None:
        if self.programs is not None:
            return run_to_end(self.backward_program(chunk, mb, grad_out, full=True))
        slot = self.slots.pop((chunk, mb))
        params = self.chunks[chunk].params
        inputs = params if slot.inp is None else [slot.inp, *params]
        grads = torch.autograd.grad(slot.root, inputs, grad_out, allow_unused=True)
        return self._split_grads(slot, params, grads)

    def _split_grads(self, slot: _Slot, params, grads) -> torch.Tensor | None:
        """Accumulate the parameter part of `grads`; return the input gradient (None on stage 0)."""
        if slot.inp is None:
            self._accumulate(params, grads)
            return None
        self._accumulate(params, grads[1:])
        return grads[0]

    def _accumulate(self, params, grads) -> None:
        for p, g in zip(params, grads):
            if g is None:
                continue
            acc = self.param_grads.get(id(p))
            if acc is None:
                self.param_grads[id(p)] = g.detach().clone()
            else:
                acc.add_(g)


class ForwardCompute:
    """StageCompute for forward-only passes (evaluation) over `chunks`: no autograd graph, no
    gradients, and the last stages' per micro-batch losses kept in `losses`. Run by the same
    executor as training, on `schedules.forward_only` lists, so activations take the training
    routes. Expert loads counted here are the caller's to discard (they must not move biases)."""

    def __init__(
        self,
        chunks: dict[int, StageChunk],
        context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        act_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.chunks = chunks
        self.context = context
        self.act_dtype = act_dtype
        self.microbatches: list[MicroBatch] = []
        self.mtp_loss_weight: float | None = None
        self.losses: dict[int, dict[str, float]] = {}

    def start(self, microbatches: list[MicroBatch], mtp_loss_weight: float | None = None) -> None:
        """The micro-batches of one held-out batch (every stage reads its segments), and the lambda
        of the objective (None: model.mtp_loss_weight)."""
        self.microbatches, self.losses = microbatches, {}
        self.mtp_loss_weight = mtp_loss_weight

    @torch.no_grad()
    def forward(self, chunk: int, mb: int, x: torch.Tensor | None) -> torch.Tensor | None:
        stage = self.chunks[chunk]
        batch = self.microbatches[mb]
        with self.context():
            out = stage.forward(
                x, batch.input_ids, batch.labels, self.mtp_loss_weight, batch.segments, batch.mtp_scales
            )
        if stage.spec.last:
            self.losses[mb] = {"loss": float(out.loss), "lm_loss": float(out.lm_loss)}
            return None
        return out.to(self.act_dtype)

    def backward_input(self, chunk: int, mb: int, grad_out: torch.Tensor | None) -> torch.Tensor | None:
        raise RuntimeError(f"forward-only compute asked for the backward of chunk {chunk} micro-batch {mb}")

    backward_full = backward_input

    def backward_weight(self, chunk: int, mb: int) -> None:
        raise RuntimeError(f"forward-only compute asked for the W of chunk {chunk} micro-batch {mb}")
