"""One expert-parallel MoE layer as phases split at its two all-to-alls, for DualPipe's overlap.

`dispatch.AllToAllDispatch` runs a layer's routed part in one call, its seams in a row, waiting
on each all-to-all where it is issued. `PhasedMoE` calls the same seams (`route`, `pack`, `experts`,
`unpack`) as a program of compute phases with the collectives launched asynchronously between them, so that a caller can compute something
else (the other micro-batch of an overlapped pair) while a transfer is in flight:

    forward   route     gate, (token, rank) pairs, counts exchanged (blocking: the splits are host
                        lists, the layer call's one host read), token rows packed and their
                        all-to-all LAUNCHED
              experts   wait for the rows; local experts; gated partial sums; combine LAUNCHED
              combine   wait; sum per token, + shared experts
    backward  combine   gradient of the combine phase; its reverse all-to-all LAUNCHED
              experts   wait; gradient of the experts phase; reverse dispatch LAUNCHED
              route     wait; gradient of the route phase -> gradient of the layer input

Each phase is its own autograd graph between detached boundary tensors, so its backward can run on
its own, layer by layer, in any interleaving with another micro-batch's phases, as long as every EP
rank issues its collectives in the same order (ranks of an EP group run the same action list).
Gradients of parameters are returned per phase (never written to `.grad`), for the executor's
accumulation. The arithmetic is AllToAllDispatch's, op for op:
`tests.test_moe_phases.test_phased_layer_equals_the_one_call_layer` holds the two to bitwise equality.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from moeforge.kernels.compute_dtype import compute_dtype
from moeforge.kernels.token_compress import compress_tokens, decompress_tokens
from moeforge.model.moe import sequence_balance_loss
from moeforge.model.transformer import MoE
from moeforge.platform.moe.dispatch import (
    AllToAllDispatch,
    CollectiveTracker,
    DispatchPlan,
    InFlight,
    Splits,
    launch_all_to_all,
)
from torch import nn


def boundary_leaf(t: torch.Tensor) -> torch.Tensor:
    """A phase boundary: the tensor's value, as a new autograd leaf."""
    return t.detach().requires_grad_(t.is_floating_point())


def phase_grads(outputs, inputs, grad_outputs) -> list[torch.Tensor | None]:
    """Gradients of one phase graph w.r.t. `inputs` (None for inputs without a gradient), from the
    outputs that require one and have a gradient given."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True) if o.requires_grad and g is not None]
    wanted = [i for i in inputs if i.requires_grad]
    if not pairs or not wanted:
        return [None] * len(inputs)
    got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
    return [next(got) if i.requires_grad else None for i in inputs]


@dataclass
class MoEPhaseState:
    """One micro-batch's pass through one layer: boundaries, graphs and in-flight transfers."""

    x: torch.Tensor | None = None  # layer input leaf [N, hidden]
    shape: tuple[int, ...] = ()  # the layer input's shape ([b, s, hidden] or [N, hidden])
    aux: torch.Tensor | None = None  # alpha * sequence balance loss, when the layer trains with one
    splits: Splits | None = None  # the forward's host splits, reused by the backward
    plan: DispatchPlan | None = None  # the pairs (token, destination) of the forward
    # route phase: outputs and the transfers it launched
    rows_out: torch.Tensor | None = None  # [P, hidden] compute dtype (what the dispatch sends, before FP8)
    routing_out: torch.Tensor | None = None  # [P, 2k] gate weights and local ids
    rows_flight: InFlight | None = None
    routing_flight: InFlight | None = None
    # experts phase
    rows_in: torch.Tensor | None = None  # received rows leaf [R, hidden]
    routing_in: torch.Tensor | None = None  # received routing leaf [R, 2k]
    partial_out: torch.Tensor | None = None  # [R, hidden]
    combine_flight: InFlight | None = None
    # combine phase
    back_in: torch.Tensor | None = None  # combined rows leaf [P, hidden]
    out: torch.Tensor | None = None  # [N, hidden]
    # backward
    x_grad_shared: torch.Tensor | None = None  # the shared experts' part of the input gradient
    grad_flight: InFlight | None = None
    grad_routing_flight: InFlight | None = None
    param_grads: dict[int, torch.Tensor] = field(default_factory=dict)


class PhasedMoE:
    """The routed and shared parts of `moe` (an MoE layer with an AllToAllDispatch installed) as
    phases; `forward_*` then `backward_*` in the order of the module docstring."""

    def __init__(self, moe: MoE, tracker: CollectiveTracker | None = None) -> None:
        if not isinstance(moe.dispatch, AllToAllDispatch):
            raise TypeError(
                f"MoE layer {moe.layer_id}: PhasedMoE needs the expert-parallel dispatch installed"
            )
        self.moe = moe
        self.dispatch: AllToAllDispatch = moe.dispatch
        self.tracker = tracker  # times each all-to-all's wait (exposed time, timeline), when set

    def _launch(self, x: torch.Tensor, send_splits: list[int], recv_splits: list[int], what: str):
        label = f"L{self.moe.layer_id} {what}"
        return launch_all_to_all(x, send_splits, recv_splits, self.dispatch.group, self.tracker, label)

    # ---- forward ----------------------------------------------------------------------------------
    def forward_route(self, x: torch.Tensor) -> MoEPhaseState:
        """x [b, s, hidden] or [N, hidden] (the post-attention norm's output) -> state with the
        dispatch in flight. Load counts and the sequence-wise balance loss as MoE.forward keeps them."""
        moe, d = self.moe, self.dispatch
        st = MoEPhaseState(x=boundary_leaf(x.reshape(-1, x.shape[-1])), shape=tuple(x.shape))  # [N, hidden]
        weights, expert_ids, affinities = moe.gate(st.x)
        if moe.training:
            moe.record_load(expert_ids)
            if moe.aux_alpha > 0 and len(st.shape) == 3:
                b, s = st.shape[:2]
                st.aux = moe.aux_alpha * sequence_balance_loss(
                    affinities.view(b, s, -1), expert_ids.view(b, s, -1), moe.n_experts, moe.top_k
                )
                moe.last_aux_loss = st.aux.detach()
        st.plan, st.splits = d.route(expert_ids)
        rows, st.routing_out = d.pack(st.plan, st.x, weights, expert_ids)  # [P, hidden], [P, 2k]
        st.rows_out = rows.to(compute_dtype(st.x))  # [P, hidden]
        payload = st.rows_out.detach()
        if d.fp8:
            payload = torch.cat(compress_tokens(rows.detach()), dim=-1)  # [P, D + D/128] uint8
        st.rows_flight = self._launch(payload, st.splits.send, st.splits.recv, "dispatch")
        st.routing_flight = self._launch(
            st.routing_out.detach(), st.splits.send, st.splits.recv, "dispatch routing"
        )
        d.stats.add_bytes(payload, payload[:0])
        return st

    def forward_experts(self, st: MoEPhaseState) -> None:
        """Wait for the rows; run the local experts; launch the combine."""
        d, hidden = self.dispatch, st.shape[-1]
        received = st.rows_flight.wait()
        if d.fp8:
            received = decompress_tokens(received[:, :hidden], received[:, hidden:], st.rows_out.dtype)
        st.rows_in, st.routing_in = boundary_leaf(received), boundary_leaf(st.routing_flight.wait())
        st.rows_flight = st.routing_flight = None
        partial = d.experts(st.rows_in, st.routing_in, self.moe.experts, st.splits)
        st.partial_out = partial.to(st.rows_out.dtype)  # [R, hidden]
        st.combine_flight = self._launch(st.partial_out.detach(), st.splits.recv, st.splits.send, "combine")
        d.stats.add_bytes(st.partial_out[:0], st.partial_out)

    def forward_combine(self, st: MoEPhaseState) -> torch.Tensor:
        """Wait for the combined rows; sum per token, add the shared experts -> the layer output, in
        the input's shape (detached: the phase's graph stays in `st`)."""
        st.back_in = boundary_leaf(st.combine_flight.wait())
        st.combine_flight = None
        out = self.dispatch.unpack(st.back_in, st.plan, st.x)
        if self.moe.shared_experts is not None:
            out = out + self.moe.shared_experts(st.x)
        st.out = out
        return out.detach().view(st.shape)

    # ---- backward ---------------------------------------------------------------------------------
    def _params(self, module: nn.Module | None) -> list[nn.Parameter]:
        return [] if module is None else [p for p in module.parameters() if p.requires_grad]

    def _keep(self, st: MoEPhaseState, params, grads) -> None:
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                acc = st.param_grads.get(id(p))
                st.param_grads[id(p)] = g if acc is None else acc + g

    def backward_combine(self, st: MoEPhaseState, grad_out: torch.Tensor) -> None:
        """grad_out (the output's shape) -> shared experts' gradients; the combine's reverse launched."""
        shared = self._params(self.moe.shared_experts)
        grads = phase_grads([st.out], [st.back_in, st.x, *shared], [grad_out.reshape(st.out.shape)])
        self._keep(st, shared, grads[2:])
        st.x_grad_shared = grads[1]
        grad_back = grads[0] if grads[0] is not None else torch.zeros_like(st.back_in)
        st.grad_flight = self._launch(grad_back, st.splits.send, st.splits.recv, "combine grad")
        st.out = None

    def backward_experts(self, st: MoEPhaseState) -> None:
        """Wait for the partial sums' gradient; the experts' gradients; the dispatch's reverse."""
        grad_partial = st.grad_flight.wait()
        experts = self._params(self.moe.experts)
        grads = phase_grads([st.partial_out], [st.rows_in, st.routing_in, *experts], [grad_partial])
        self._keep(st, experts, grads[2:])
        grad_rows = grads[0] if grads[0] is not None else torch.zeros_like(st.rows_in)
        grad_routing = grads[1] if grads[1] is not None else torch.zeros_like(st.routing_in)
        st.grad_flight = self._launch(
            grad_rows.to(st.rows_out.dtype), st.splits.recv, st.splits.send, "dispatch grad"
        )
        st.grad_routing_flight = self._launch(
            grad_routing, st.splits.recv, st.splits.send, "dispatch routing grad"
        )
        st.partial_out = None

    def backward_route(self, st: MoEPhaseState) -> torch.Tensor:
        """Wait for the dispatch's reverse; the router's gradients -> gradient of the layer input."""
        grad_rows = st.grad_flight.wait()
        grad_routing = st.grad_routing_flight.wait()
        gate = self._params(self.moe.gate)
        outputs, grad_outputs = [st.rows_out, st.routing_out], [grad_rows, grad_routing]
        if st.aux is not None and st.aux.requires_grad:  # unit weight, as AddAuxiliaryLoss injects it
            outputs.append(st.aux)
            grad_outputs.append(torch.ones_like(st.aux))
        grads = phase_grads(outputs, [st.x, *gate], grad_outputs)
        self._keep(st, gate, grads[1:])
        grad_x = grads[0] if grads[0] is not None else torch.zeros_like(st.x)
        if st.x_grad_shared is not None:
            grad_x = grad_x + st.x_grad_shared
        st.rows_out = st.routing_out = st.aux = None
        return grad_x.view(st.shape)
