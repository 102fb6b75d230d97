"""Host synchronisations of one MoE layer's forward and backward, counted on the CPU.

On a GPU the host must run ahead of the device; each call below makes it wait for the device (a
device-to-host read, or a size the host learns from device data). Counted, while a layer runs, are
calls whose calling frame is a file of moeforge's model/ or platform/ (kernels/, torch's own Python
and the tests are not counted):

    reads       Tensor.tolist / item / cpu / numpy / __int__ / __float__ / __bool__ / __index__,
                Tensor.to(a CPU device)
    data sizes  torch.nonzero / argwhere / unique / masked_select / bincount (CUDA reads the input's
                max to size its output), repeat_interleave with tensor repeats and no output_size,
                torch.where(cond) with one argument, indexing with a boolean mask (a nonzero inside)
    host tables torch.tensor / as_tensor of host data (a pageable copy to the device)

The experts module is the one the precision policy installs (GroupedSwiGLUExperts, plain GEMMs
under fp32): its group sizes are read, where they are, in kernels/, which is not counted here. The
torch reference loop (RoutedExperts, the single-device path's default) reads them in model/moe.py:
its one read is counted by its own test.

Expert parallelism (2 spawned gloo ranks, ep=2), per layer call, training mode with the balance
loss, tokens dispatched in the compute dtype or as FP8 tiles: forward reads the host once (the
split sizes all_to_all_single takes, sent and received in one read), backward never (it reuses the
forward's splits); the same for the one-call layer (AllToAllDispatch) and the phases (PhasedMoE).
The count exchange travels over the group given as `counts_group`, apart from the bulk
all-to-alls. The routing statistics add up on the device; `as_tensor()` (once per step, by the
runtime) gives what a host count of the same routing gives.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from moeforge.model.transformer import MoE
from moeforge.platform.config.precision import PrecisionConfig
from moeforge.platform.launch.local_spawn import spawn_gloo
from moeforge.platform.moe.dispatch import destination_counts, plan_dispatch, spread_per_token
from moeforge.platform.moe.expert_placement import ExpertPlacement
from moeforge.platform.moe.install import install_dispatch
from moeforge.platform.moe.phased import PhasedMoE
from moeforge.platform.moe.routing_stats import RoutingStats
from moeforge.platform.precision import apply_precision
from test_expert_parallel import HIDDEN, _layer, _moe_config, expert_parallel_copy

_MODEL = Path(sys.modules[MoE.__module__].__file__).resolve().parent
_PLATFORM = Path(sys.modules[PhasedMoE.__module__].__file__).resolve().parents[1]
_ROOTS = (f"{_MODEL}/", f"{_PLATFORM}/")

_READS = ("tolist", "item", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")
_SIZED = ("nonzero", "argwhere", "unique", "masked_select", "bincount")


def _counted_caller() -> str | None:
    """'file:line' of the frame that called the wrapped function, when it is moeforge's."""
    frame = sys._getframe(2)
    path = frame.f_code.co_filename
    if not path.startswith(_ROOTS):
        return None
    root = _MODEL if path.startswith(_ROOTS[0]) else _PLATFORM
    return f"{root.name}/{Path(path).relative_to(root)}:{frame.f_lineno}"


def _is_mask(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def _to_cpu(args, kwargs) -> bool:
    targets = [*args, kwargs.get("device")]
    return any(isinstance(t, (str, torch.device)) and torch.device(t).type == "cpu" for t in targets)


@contextlib.contextmanager
def host_syncs():
    """Count the calls listed in the module docstring made from moeforge's model/ and platform/
    while the block runs: yields a Counter {'kind file:line': calls}."""
    counts: Counter = Counter()
    patched: list[tuple[object, str, object]] = []

    def wrap(owner, name, when=lambda *a, **k: True):
        original = getattr(owner, name)
        own = owner.__dict__.get(name, None) if isinstance(owner, type) else original

        def counted(*args, **kwargs):
            where = _counted_caller()
            if where is not None and when(*args, **kwargs):
                counts[f"{name} {where}"] += 1
            return original(*args, **kwargs)

        patched.append((owner, name, own))
        setattr(owner, name, counted)

    for name in _READS:
        wrap(torch.Tensor, name)
    for name in _SIZED:
        wrap(torch.Tensor, name)
        wrap(torch, name)
    wrap(torch.Tensor, "to", lambda self, *a, **k: _to_cpu(a, k))

    def tensor_repeats(x, repeats=None, *args, **kwargs) -> bool:
        return isinstance(repeats, torch.Tensor) and "output_size" not in kwargs

    wrap(torch.Tensor, "repeat_interleave", tensor_repeats)
    wrap(torch, "repeat_interleave", tensor_repeats)
    wrap(torch, "where", lambda *a, **k: len(a) + len(k) == 1)
    wrap(torch.Tensor, "__getitem__", lambda self, index: _is_mask(index))
    wrap(torch.Tensor, "__setitem__", lambda self, index, value: _is_mask(index))
    wrap(torch, "tensor")
    wrap(torch, "as_tensor", lambda data, *a, **k: not isinstance(data, torch.Tensor))
    try:
        yield counts
    finally:
        for owner, name, own in reversed(patched):
            if own is None:
                delattr(owner, name)
            else:
                setattr(owner, name, own)


def test_the_counter_sees_moeforge_frames_only():
    placement = ExpertPlacement(n_experts=8, ep=2)
    expert_ids = torch.tensor([[0, 5], [1, 2]])  # [N, k]
    with host_syncs() as reads:
        plan = plan_dispatch(expert_ids, placement)  # without n_pairs it reads their number
        assert plan.pair_token.tolist() == [0, 1, 0]  # the test's own read: not counted
    ((where, calls),) = reads.items()
    assert where.startswith("__int__ platform/moe/dispatch.py:") and calls == 1, reads


# ---- expert parallelism ------------------------------------------------------------------------------
def _ep_layer(rank: int, world: int, counts_group=None, fp8: bool = False) -> MoE:
    """The EP layer of test_expert_parallel, balance loss on, with the policy's experts module;
    `fp8`: tokens dispatched as FP8 tiles."""
    layer = expert_parallel_copy(_layer(_moe_config()), rank, world, fp8=fp8)[0]
    apply_precision(layer, PrecisionConfig())  # GroupedSwiGLUExperts (plain GEMMs under fp32)
    if counts_group is not None:
        install_dispatch(
            [layer], layer.dispatch.placement, None, False, layer.dispatch.stats, counts_group=counts_group
        )
    return layer


def _one_call(layer: MoE, x: torch.Tensor, grad: torch.Tensor) -> tuple[Counter, Counter, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    with host_syncs() as forward:
        y = layer(x)
    with host_syncs() as backward:
        y.backward(grad)
    return forward, backward, y.detach()


def _phased(layer: MoE, x: torch.Tensor, grad: torch.Tensor) -> tuple[Counter, Counter, torch.Tensor]:
    phased = PhasedMoE(layer)
    with host_syncs() as forward:
        st = phased.forward_route(x)
        phased.forward_experts(st)
        y = phased.forward_combine(st)
    with host_syncs() as backward:
        phased.backward_combine(st, grad)
        phased.backward_experts(st)
        phased.backward_route(st)
    return forward, backward, y


CALLS = 3  # counted layer calls, after one uncounted call (first-call set-up is not per call)


def _count_case(rank: int, world: int, path: str, fp8: bool) -> dict:
    layer = _ep_layer(rank, world, fp8=fp8)
    run = _one_call if path == "one call" else _phased
    gen = torch.Generator().manual_seed(7 + rank)
    forward, backward = Counter(), Counter()
    for call in range(CALLS + 1):
        x = torch.randn(2, 24, HIDDEN, generator=gen)
        f, b, _ = run(layer, x, torch.randn(x.shape, generator=gen))
        if call:
            forward.update(f)
            backward.update(b)
    return {"forward": dict(forward), "backward": dict(backward), "tokens": layer.dispatch.stats.tokens}


@pytest.mark.parametrize("fp8", [False, True], ids=["compute dtype", "fp8 dispatch"])
@pytest.mark.parametrize("path", ["one call", "phased"])
def test_expert_parallel_layer_reads_the_host_once_per_forward(path, fp8):
    for rank, r in spawn_gloo(_count_case, 2, (path, fp8), timeout_s=120).items():
        assert r["tokens"] == (CALLS + 1) * 48, (rank, r)  # every call ran and was counted in the stats
        # the split sizes, sent and received, in one read
        ((where, calls),) = r["forward"].items()
        assert where.startswith("tolist platform/moe/dispatch.py:") and calls == CALLS, (rank, r)
        assert r["backward"] == {}, (rank, r)


# ---- the single-device path ------------------------------------------------------------------------
@pytest.mark.parametrize("policy_experts", [False, True])
def test_single_device_layer_reads_only_the_reference_loops_sizes(policy_experts):
    layer = _layer(_moe_config())
    if policy_experts:
        apply_precision(layer, PrecisionConfig())
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        x = torch.randn(2, 24, HIDDEN, generator=gen)
        with host_syncs() as forward:
            y = layer(x.requires_grad_(True))
        with host_syncs() as backward:
            y.backward(torch.randn(y.shape, generator=gen))
    assert backward == {}
    if policy_experts:  # its group sizes are read in kernels/, not counted here
        assert forward == {}
    else:  # RoutedExperts' torch.split of the sorted rows: the one read of the reference loop
        ((where, calls),) = forward.items()
        assert where.startswith("tolist model/moe.py:") and calls == 1, forward


# ---- the count exchange's own group ------------------------------------------------------------------
def _groups_case(rank: int, world: int) -> dict:
    counts_group = dist.new_group(list(range(world)))
    results = {}
    for separate in (False, True):
        layer = _ep_layer(rank, world, counts_group if separate else None)
        calls: list[str] = []
        original = dist.all_to_all_single

        def recorded(output, input, *args, group=None, calls=calls, original=original, **kwargs):
            calls.append("counts group" if group is counts_group else "default group")
            return original(output, input, *args, group=group, **kwargs)

        dist.all_to_all_single = recorded
        try:
            gen = torch.Generator().manual_seed(11 + rank)
            x = torch.randn(2, 24, HIDDEN, generator=gen)
            one = _one_call(layer, x, torch.randn(x.shape, generator=gen))[2]
            phased = _phased(layer, x, torch.randn(x.shape, generator=gen))[2]
        finally:
            dist.all_to_all_single = original
        results[separate] = {"calls": calls, "out": one.numpy().tobytes(), "phased": phased.numpy().tobytes()}
    return results


def test_count_exchange_goes_over_its_own_group():
    for rank, r in spawn_gloo(_groups_case, 2, (), timeout_s=120).items():
        # one call: counts, rows, routing, combine; backward: 3 reverses. Phases: the same 4 + 3
        shared, separate = r[False]["calls"], r[True]["calls"]
        assert shared == ["default group"] * 14, (rank, shared)
        counts_first = ["counts group"] + ["default group"] * 6
        assert separate == counts_first * 2, (rank, separate)
        # the same rows to the same ranks: outputs bit-identical either way
        assert r[True]["out"] == r[False]["out"] == r[True]["phased"], rank


# ---- routing statistics ------------------------------------------------------------------------------
def test_routing_statistics_add_up_on_the_device():
    placement = ExpertPlacement.with_ranks_per_node(n_experts=16, ep=4, ep_rank=1, ranks_per_node=2)
    table = placement.node_of_rank_tensor("cpu")  # built once; a layer call reuses it
    gen = torch.Generator().manual_seed(3)
    batches = [torch.rand(n, 16, generator=gen).topk(3, dim=1).indices for n in (20, 0, 9)]  # [N, k]
    stats = RoutingStats()
    with host_syncs() as reads:
        for expert_ids in batches:
            stats.add(*spread_per_token(destination_counts(expert_ids, placement)[0], placement))
    assert reads == {}
    assert placement.node_of_rank_tensor(torch.device("cpu")) is table
    # the same routing counted on the host: distinct ranks (4 experts each) and nodes (2 ranks each)
    ranks = [len({e // 4 for e in token}) for ids in batches for token in ids.tolist()]
    nodes = [len({e // 8 for e in token}) for ids in batches for token in ids.tolist()]
    summed = stats.as_tensor()
    assert summed.dtype == torch.float64
    assert summed.tolist() == [29, sum(ranks), sum(nodes), max(ranks), max(nodes), 0, 0, 0, 1]
    assert 0 < sum(nodes) < sum(ranks)  # some tokens reach two ranks of one node
    stats.reset()
    assert stats.as_tensor().tolist() == [0.0] * 9 and summed[0] == 29  # a taken tensor stays
