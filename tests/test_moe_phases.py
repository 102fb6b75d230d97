"""PhasedMoE (platform/moe/phased.py): an expert-parallel MoE layer as compute phases with the
all-to-alls launched asynchronously between them, on real gloo collectives.

- against the one-call AllToAllDispatch layer: outputs and every gradient equal (<= 1e-6; the
  input gradient adds the same three parts in another order);
- two micro-batches, one forward and one backward, run one after the other and interleaved phase
  by phase (an overlapped pair: one's transfer in flight while the other computes): bit-identical.
"""

from __future__ import annotations

import torch
from moeforge.platform.launch.local_spawn import spawn_gloo
from moeforge.platform.moe.phased import PhasedMoE
from test_expert_parallel import HIDDEN, _layer, _moe_config, expert_parallel_copy


def _ep_layer(rank: int, world: int):
    cfg = _moe_config(seq_aux_loss_alpha=0.0)  # the balance loss is not part of the phases yet
    return expert_parallel_copy(_layer(cfg), rank, world, fp8=False)[0]


def _inputs(rank: int, mb: int):
    gen = torch.Generator().manual_seed(1000 * rank + mb)
    return torch.randn(40, HIDDEN, generator=gen), torch.randn(40, HIDDEN, generator=gen)


def _params(layer):
    return [p for p in layer.parameters() if p.requires_grad]


def _phased_vs_one_call(rank: int, world: int) -> dict:
    layer = _ep_layer(rank, world)
    x, grad_out = _inputs(rank, 0)
    # one call: the layer's own forward (load counts included), autograd through the dispatch
    x_ref = x.clone().requires_grad_(True)
    y_ref = layer(x_ref.unsqueeze(0)).squeeze(0)
    ref_grads = torch.autograd.grad(y_ref, [x_ref, *_params(layer)], grad_out, allow_unused=True)
    # phases
    phased = PhasedMoE(layer)
    st = phased.forward_route(x)
    phased.forward_experts(st)
    y = phased.forward_combine(st)
    phased.backward_combine(st, grad_out)
    phased.backward_experts(st)
    grad_x = phased.backward_route(st)
    diffs = {"out": float((y - y_ref).abs().max()), "x": float((grad_x - ref_grads[0]).abs().max())}
    for p, g in zip(_params(layer), ref_grads[1:], strict=True):
        mine = st.param_grads.get(id(p))
        if g is None:
            diffs[f"param{id(p)}"] = 0.0 if mine is None else float(mine.abs().max())
        else:
            diffs[f"param{id(p)}"] = float((mine - g).abs().max() / g.abs().max().clamp_min(1e-30))
    return diffs


def test_phased_layer_equals_the_one_call_layer():
    for rank, diffs in spawn_gloo(_phased_vs_one_call, 2, (), timeout_s=120).items():
        assert all(d <= 1e-6 for d in diffs.values()), (rank, diffs)


def _pair(rank: int, world: int, interleaved: bool) -> list[bytes]:
    """Micro-batch 1's backward (its forward done before) and micro-batch 2's forward; the results'
    raw bytes (tensors would go back through shared memory that ends with the process)."""
    layer = _ep_layer(rank, world)
    phased = PhasedMoE(layer)
    x1, g1 = _inputs(rank, 1)
    x2, _ = _inputs(rank, 2)
    first = phased.forward_route(x1)
    phased.forward_experts(first)
    phased.forward_combine(first)
    if interleaved:  # V3's overlapped pair: each phase's transfer travels during the other's compute
        second = phased.forward_route(x2)
        phased.backward_combine(first, g1)
        phased.forward_experts(second)
        phased.backward_experts(first)
        y2 = phased.forward_combine(second)
        grad_x1 = phased.backward_route(first)
    else:
        phased.backward_combine(first, g1)
        phased.backward_experts(first)
        grad_x1 = phased.backward_route(first)
        second = phased.forward_route(x2)
        phased.forward_experts(second)
        y2 = phased.forward_combine(second)
    results = [y2, grad_x1, *(first.param_grads[id(p)] for p in _params(layer) if id(p) in first.param_grads)]
    return [t.detach().numpy().tobytes() for t in results]


def test_interleaved_pair_is_bit_identical_to_sequential():
    sequential = spawn_gloo(_pair, 2, (False,), timeout_s=120)
    interleaved = spawn_gloo(_pair, 2, (True,), timeout_s=120)
    for rank in sequential:
        assert len(sequential[rank]) == len(interleaved[rank]) > 2
        for a, b in zip(sequential[rank], interleaved[rank], strict=True):
            assert a == b, rank
