"""A stage chunk's forward and backward as programs of phases, split where the MoE layers communicate.

`stages.StageChunk.forward` runs a chunk in one autograd graph, every all-to-all waited on
where it is issued. Here the same modules run as generator programs that yield right after each
all-to-all is launched, so that a caller can run another program (the other micro-batch of a
DualPipe F&B pair) while the transfer travels:

    forward    [embedding]; per block: the model's own phases (`Block.attention_phase`, then for an
               expert-parallel MoE block PhasedMoE's route | experts | combine phases, a yield
               after each launch, and `Block.residual`), otherwise the whole block as one phase;
               [final norm, head, loss and the MTP chain as one phase]
    backward   the same phases in reverse, each an autograd graph between detached boundaries

`run_pair(forward, backward)` advances the two programs alternately, one phase each (`interleave`):
V3's overlapped pair, with each phase's all-to-all in flight while the other micro-batch computes
its next phase. The math of
a program does not depend on what runs between its phases, so interleaved and sequential pairs
give bit-identical results
(`tests.test_overlap.test_overlap_on_and_off_are_bit_identical_and_match_reference`).

Each forward phase enters the precision context itself (an autocast block must not span a yield:
two programs would exit each other's); each backward phase enters the run's WeightGradStore (one
queued batch per phase; W flushes the run's batches, so the weight-gradient GEMMs stay deferrable).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from moeforge.kernels.wgrad_store import WeightGradStore
from moeforge.model.transformer import MoE
from moeforge.platform.config.parallel import OVERLAP_ORDERS
from moeforge.platform.moe.dispatch import AllToAllDispatch, CollectiveTracker
from moeforge.platform.moe.phased import MoEPhaseState, PhasedMoE, boundary_leaf, phase_grads
from torch import nn

if TYPE_CHECKING:  # `stages` builds programs from this module, so only the annotation names it
    from moeforge.platform.data.microbatches import MicroBatch
    from moeforge.platform.engine.stages import StageChunk

Program = Generator[None, None, object]  # yields at each launched transfer; returns its result


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


@dataclass
class _Phase:
    """One compute phase's graph: what its backward starts from and what it differentiates."""

    inputs: list[torch.Tensor]  # leaves: boundary tensors (their gradients flow on) ...
    params: list[nn.Parameter]  # ... and parameters (their gradients are accumulated)
    outputs: list[torch.Tensor]
    moe: MoEPhaseState | None = None  # set for the three phases of an expert-parallel MoE ...
    phased: PhasedMoE | None = None  # ... and the layer they belong to


@dataclass
class ChunkRun:
    """One (chunk, micro-batch): its phases in forward order, and its deferred weight gradients."""

    phases: list[_Phase] = field(default_factory=list)
    store: WeightGradStore = field(default_factory=WeightGradStore)
    loss: object = None  # LossOutput on the last stage


class ChunkProgram:
    """Forward and backward programs of one StageChunk; gradients go to `accumulate(params, grads)`."""

    def __init__(
        self,
        chunk: StageChunk,
        context: Callable[[], contextlib.AbstractContextManager],
        accumulate: Callable[[list[nn.Parameter], list[torch.Tensor | None]], None],
        tracker: CollectiveTracker | None = None,
    ) -> None:
        self.chunk, self.context, self.accumulate = chunk, context, accumulate
        self.phased_moe = {
            id(b.mlp): PhasedMoE(b.mlp, tracker)
            for b in chunk.blocks
            if isinstance(b.mlp, MoE) and isinstance(b.mlp.dispatch, AllToAllDispatch)
        }

    # ---- forward ----------------------------------------------------------------------------------
    def forward(
        self, run: ChunkRun, x, batch: MicroBatch, loss_scale: float, mtp_loss_weight: float | None = None
    ) -> Program:
        """x [b, s, hidden] (None on the first stage) -> h [b, s, hidden] detached, or on the last
        stage None (the loss, times loss_scale, is the root of the last phase; its MTP term weighted
        by `mtp_loss_weight`, None: model.mtp_loss_weight, and its depths by batch.mtp_scales).
        `batch.segments` [b, s]: the micro-batch's packed rows (None: one document per row), read by
        every block's attention phase and the MTP chain, as StageChunk.forward passes them."""
        model, spec = self.chunk.model, self.chunk.spec
        segments = batch.segments
        h = None if spec.first else x
        if spec.first:
            with self.context():
                out = model.embed_tokens(batch.input_ids)
            run.phases.append(_Phase([], _trainable(model.embed), [out]))
            h = out.detach()
        for block in self.chunk.blocks:
            phased = self.phased_moe.get(id(block.mlp))
            h_in = boundary_leaf(h)
            if phased is None:  # no transfer inside: the whole block is one phase
                with self.context():
                    out = block(h_in, segments=segments)
                run.phases.append(_Phase([h_in], _trainable(block), [out]))
                h = out.detach()
                continue
            with self.context():
                h1, x_norm = block.attention_phase(h_in, segments=segments)
            attn_params = [p for m in block.attention_phase_modules() for p in _trainable(m)]
            run.phases.append(_Phase([h_in], attn_params, [h1, x_norm]))
            with self.context():
                st = phased.forward_route(x_norm.detach())
            yield  # the dispatch travels
            with self.context():
                phased.forward_experts(st)
            yield  # the combine travels
            with self.context():
                moe_out = phased.forward_combine(st)
            run.phases.append(_Phase([], [], [], moe=st, phased=phased))
            h = block.residual(h1.detach(), moe_out)  # its backward is the identity
        if not spec.last:
            return h
        h_in = boundary_leaf(h)
        with self.context():
            run.loss = model.head_and_loss(
                h_in, batch.input_ids, batch.labels, mtp_loss_weight, segments, batch.mtp_scales
            )
        head_params = _trainable(model.norm) + _trainable(model.head) + _trainable(model.mtp)
        if len(model.mtp) > 0:
            head_params += _trainable(model.embed)
        run.phases.append(_Phase([h_in], _dedup(head_params), [run.loss.loss * loss_scale]))
        return None

    # ---- backward ---------------------------------------------------------------------------------
    def backward(self, run: ChunkRun, grad_out: torch.Tensor | None) -> Program:
        """Input-gradient backward (weight-gradient GEMMs queued in run.store) -> the gradient of the
        chunk input (None on the first stage)."""
        grad = grad_out  # the gradient flowing down, w.r.t. the current phase's output
        pending_residual: torch.Tensor | None = None  # grad of h1 from an MoE block's residual
        for phase in reversed(run.phases):
            if phase.moe is not None:
                phased, st = phase.phased, phase.moe
                pending_residual = grad
                with run.store.defer():
                    phased.backward_combine(st, grad)
                yield  # the combine's gradient travels back
                with run.store.defer():
                    phased.backward_experts(st)
                yield  # the dispatch's gradient travels back
                with run.store.defer():
                    grad = phased.backward_route(st)  # w.r.t. x_norm
                params = [p for p in _trainable(phased.moe) if id(p) in st.param_grads]
                self.accumulate(params, [st.param_grads[id(p)] for p in params])
                continue
            if pending_residual is not None:  # the attention phase of an MoE block: (h1, x_norm)
                grad_outputs = [pending_residual, grad]
                pending_residual = None
            else:
                grad_outputs = [torch.ones_like(phase.outputs[0]) if grad is None else grad]
            with run.store.defer():
                grads = phase_grads(phase.outputs, phase.inputs + phase.params, grad_outputs)
            self.accumulate(phase.params, grads[len(phase.inputs) :])
            grad = grads[0] if phase.inputs else None
        run.phases = []
        return grad


def _dedup(params: list[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def run_to_end(program: Program):
    """Run a program without interleaving; its result."""
    try:
        while True:
            next(program)
    except StopIteration as done:
        return done.value


PhaseHook = Callable[[str, object, object], None]  # (program name, start, end) of one phase


def interleave(
    programs: list[Program],
    on_done: list[Callable[[object], None] | None] | None = None,
    on_phase: Callable[[int, object, object], None] | None = None,
    now: Callable[[], object] = time.perf_counter,
) -> list[object]:
    """Advance the programs one phase each in turn, in list order, until all end; their results.
    `on_done[i]` sees program i's result as soon as it ends (the executor sends a forward's
    activations then, while the other program still computes); `on_phase(i, start, end)` sees
    each phase's span as two readings of `now` (the step's clock: the timeline)."""
    on_done = on_done or [None] * len(programs)
    results: list[object] = [None] * len(programs)
    live = dict(enumerate(programs))
    while live:
        for i in list(live):
            start = now()
            try:
                next(live[i])
                if on_phase is not None:
                    on_phase(i, start, now())
            except StopIteration as done:
                if on_phase is not None:
                    on_phase(i, start, now())
                results[i] = done.value
                del live[i]
                if on_done[i] is not None:
                    on_done[i](done.value)
    return results


def run_pair(
    forward: Program,
    backward: Program,
    on_forward_done: Callable[[object], None] | None = None,
    order: str = "backward_first",
    on_phase: PhaseHook | None = None,
    now: Callable[[], object] = time.perf_counter,
) -> tuple[object, object]:
    """V3's overlapped F&B pair: the two programs interleaved phase by phase; (forward result,
    backward result). `order` says whose phase runs first (parallel.overlap_order). Backward first
    lets the backward's short opening phase (the head, or the last block's residual) launch its
    combine gradient right away, so the forward's long attention phase covers it; forward first
    waits on the forward's dispatch behind that short phase (`platform.schedules.phase_costs.overlapped_pair`
    predicts both). The order must be the same on every rank of an EP group (their collectives pair up in
    launch order): it is a fixed setting, never decided by timing. `on_phase("F" | "B", start,
    end)` sees every phase's span as readings of `now`."""
    if order not in OVERLAP_ORDERS:
        raise ValueError(f"parallel.overlap_order: {order!r} is not one of {OVERLAP_ORDERS}")
    names = ("F", "B") if order == "forward_first" else ("B", "F")
    hook = None if on_phase is None else (lambda i, start, end: on_phase(names[i], start, end))
    if order == "forward_first":
        f, b = interleave([forward, backward], [on_forward_done, None], hook, now)
    else:
        b, f = interleave([backward, forward], [None, on_forward_done], hook, now)
    return f, b
