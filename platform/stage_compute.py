"""The model side of the executor: forward and split backward of a rank's stage chunks.

B and W are split with autograd alone: B takes the gradient w.r.t. the stage input with the graph
retained, W later takes the gradients w.r.t. the stage's parameters through the same graph. Both
use `torch.autograd.grad`, which returns gradients instead of accumulating them into `.grad`: the
weight gradients go into this object's own buffers (`param_grads`) and reach the optimizer once per
step (see platform/zero.py), so no per-parameter hook (DeepSpeed's) fires in the middle of a
pipeline step, when the ranks of a dp group are at different points of their action lists.

Cost note: with plain autograd, W re-traverses the stage's graph (the input-gradient chain is
recomputed) because autograd cannot keep B's intermediate gradients; the deferred weight-gradient
store of FP8Linear / DeferrableLinear (kernels) removes that by capturing each Linear's (input,
output-gradient) during B, when available.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moeforge.platform.stages import StageChunk


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [b, s]
    labels: torch.Tensor  # [b, s]


@dataclass
class _Slot:
    """Live state of one (chunk, micro-batch) between its F and its W."""

    inp: torch.Tensor | None  # stage input with requires_grad (None on the first stage)
    root: torch.Tensor  # what backward starts from: the stage output, or the scaled loss
    grad_out: torch.Tensor | None = None


class ModelCompute:
    """StageCompute over `chunks` (local chunk index -> StageChunk) for one step's micro-batches.

    Each micro-batch's loss is multiplied by `loss_scale` before its backward (1/M for M
    micro-batches, as the reference loop does). Per micro-batch loss values are kept in `losses`
    (last-stage chunks only)."""

    def __init__(self, chunks: dict[int, StageChunk], loss_scale: float) -> None:
        self.chunks = chunks
        self.loss_scale = loss_scale
        self.microbatches: list[MicroBatch] = []
        self.slots: dict[tuple[int, int], _Slot] = {}
        self.losses: dict[int, dict[str, float]] = {}
        self.aux_loss_sum = 0.0  # balance losses recorded by this rank's MoE layers this step
        # Parameters shared by two chunks (the embedding on a DualPipe rank) appear once.
        seen, self.params = set(), []
        for c in sorted(chunks):
            for p in chunks[c].params:
                if id(p) not in seen:
                    seen.add(id(p))
                    self.params.append(p)
        self.param_grads: dict[int, torch.Tensor] = {}

    def start_step(self, microbatches: list[MicroBatch]) -> None:
        if self.slots:
            raise RuntimeError(f"{len(self.slots)} micro-batch states left over from the previous step")
        self.microbatches = microbatches
        self.losses = {}
        self.aux_loss_sum = 0.0

    def take_grads(self) -> dict[int, torch.Tensor]:
        """The step's accumulated weight gradients, keyed by id(param); resets the buffers."""
        grads, self.param_grads = self.param_grads, {}
        return grads

    # ---- StageCompute -----------------------------------------------------------------------------
    def forward(self, chunk: int, mb: int, x: torch.Tensor | None) -> torch.Tensor | None:
        stage = self.chunks[chunk]
        inp = None if stage.spec.first else x.detach().requires_grad_(True)
        if stage.spec.first or stage.spec.last:
            batch = self.microbatches[mb]
            out = stage.forward(inp, batch.input_ids, batch.labels)
        else:  # middle stages never see tokens
            out = stage.forward(inp, None, None)
        for moe in stage.moe_layers:
            if moe.last_aux_loss is not None:
                self.aux_loss_sum += float(moe.last_aux_loss)
        if stage.spec.last:
            self.losses[mb] = {
                "loss": float(out.loss.detach()),
                "lm_loss": float(out.lm_loss.detach()),
                "mtp_loss": float(out.mtp_loss.detach()),
            }
            self.slots[(chunk, mb)] = _Slot(inp, out.loss * self.loss_scale)
            return None
        self.slots[(chunk, mb)] = _Slot(inp, out)
        return out.detach()

    def backward_input(self, chunk: int, mb: int, grad_out: torch.Tensor | None) -> torch.Tensor | None:
        slot = self.slots[(chunk, mb)]
        slot.grad_out = grad_out
        if slot.inp is None:
            return None  # first stage: no input gradient to pass on; W does the whole backward
        (grad_in,) = torch.autograd.grad(slot.root, [slot.inp], grad_out, retain_graph=True)
        return grad_in

    def backward_weight(self, chunk: int, mb: int) -> None:
        slot = self.slots.pop((chunk, mb))
        params = self.chunks[chunk].params
        grads = torch.autograd.grad(slot.root, params, slot.grad_out, allow_unused=True)
        self._accumulate(params, grads)

    def backward_full(self, chunk: int, mb: int, grad_out: torch.Tensor | None) -> torch.Tensor | None:
        slot = self.slots.pop((chunk, mb))
        params = self.chunks[chunk].params
        inputs = params if slot.inp is None else [slot.inp, *params]
        grads = torch.autograd.grad(slot.root, inputs, grad_out, allow_unused=True)
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
