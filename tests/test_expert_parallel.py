"""The expert-parallel dispatch on real gloo collectives, against the single-device MoE.

Two (or four) spawned processes each route their own tokens through one MoE layer whose experts are
split over the group (platform/moe). Every rank also holds the full layer (same seed), so it can
compute the single-device answer for its tokens with `LocalDispatch` and compare: outputs, input
gradients, router gradients and (summed over the group) expert gradients. Plus the pieces: the
placement and its node mapping, each (token, rank) pair sent once, the FP8 payload's bytes and
error bound, and configuration errors before any launch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from moeforge.kernels.token_compress import compress_tokens, decompress_tokens
from moeforge.model.config import ModelConfig
from moeforge.model.init import init_weights
from moeforge.model.transformer import MoE
from moeforge.platform.config import TrainConfig
from moeforge.platform.config.builder import ConfigError
from moeforge.platform.engine.topology import Topology
from moeforge.platform.launch.local_spawn import spawn_gloo
from moeforge.platform.moe.dispatch import plan_dispatch
from moeforge.platform.moe.expert_placement import ExpertPlacement
from moeforge.platform.moe.install import install_dispatch, shard_experts
from moeforge.platform.moe.routing_stats import RoutingStats
from pipeline_cases import pipeline_config, tiny_model

HIDDEN = 128  # one FP8 tile per row: the payload is 128 + 1 bytes


def _moe_config(**changes) -> ModelConfig:
    values = tiny_model(hidden_size=HIDDEN, **changes)
    return ModelConfig(**values)


def _layer(cfg: ModelConfig) -> MoE:
    moe = MoE(cfg, layer_id=1)
    init_weights(moe, 0.05, seed=3)
    with torch.no_grad():  # a router bias that is not all zeros: selection uses it
        moe.gate.e_score_correction_bias.copy_(torch.linspace(-0.02, 0.02, cfg.n_routed_experts))
    return moe


def expert_parallel_copy(
    full: MoE, rank: int, world: int, fp8: bool
) -> tuple[MoE, ExpertPlacement, RoutingStats]:
    """`full` as EP rank `rank` of `world` holds it: its slice of the experts (the same weights),
    the all-to-all dispatch over the default group."""
    layer = copy.deepcopy(full)
    placement = ExpertPlacement(full.n_experts, world, rank)
    shard_experts([layer], placement)
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(layer.experts, name).copy_(getattr(full.experts, name)[placement.local_experts])
    stats = RoutingStats()
    install_dispatch([layer], placement, group=None, fp8=fp8, stats=stats)
    return layer, placement, stats


def _dispatch_case(rank: int, world: int, fp8: bool, skew: float) -> dict:
    """Route this rank's tokens through the EP layer and the full local layer; return differences."""
    cfg = _moe_config()
    full = _layer(cfg)
    if skew:  # favour the experts of EP rank 0 (group 0 of the router's two groups)
        with torch.no_grad():
            full.gate.e_score_correction_bias[: cfg.n_routed_experts // 2] += skew
    ep_layer, placement, stats = expert_parallel_copy(full, rank, world, fp8)

    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(2, 24, HIDDEN, generator=gen)
    x_ep = x.clone().requires_grad_(True)
    x_full = x.clone().requires_grad_(True)
    y_ep, y_full = ep_layer(x_ep), full(x_full)
    grad_out = torch.randn(y_ep.shape, generator=gen)
    y_ep.backward(grad_out)
    y_full.backward(grad_out)

    # the experts' gradients: each rank holds its slice, the full layer's are summed over all ranks
    expert_grads = {}
    for name in ("gate_proj", "up_proj", "down_proj"):
        full_weight, mine = getattr(full.experts, name), getattr(ep_layer.experts, name)
        total = torch.zeros_like(full_weight) if full_weight.grad is None else full_weight.grad.clone()
        dist.all_reduce(total)
        mine = torch.zeros_like(mine) if mine.grad is None else mine.grad  # no token came: no gradient
        scale = total.abs().max().clamp_min(1e-30)
        expert_grads[name] = float((mine - total[placement.local_experts]).abs().max() / scale)

    flat_ids = full.gate(x.reshape(-1, HIDDEN))[1]
    unique_pairs = int(plan_dispatch(flat_ids, placement).send_counts.sum())
    recv = torch.zeros(world, dtype=torch.long)
    recv[rank] = int(stats.dispatch_bytes)
    return {
        "out": float((y_ep - y_full).detach().abs().max() / y_full.detach().abs().max()),
        "x_grad": float((x_ep.grad - x_full.grad).abs().max() / x_full.grad.abs().max()),
        "gate_grad": float(
            (ep_layer.gate.weight.grad - full.gate.weight.grad).abs().max()
            / full.gate.weight.grad.abs().max()
        ),
        "expert_grads": expert_grads,
        "pairs": unique_pairs,
        "pairs_with_repeats": flat_ids.numel(),
        "tokens": stats.tokens,
        "rank_sum": stats.rank_sum,
        "dispatch_bytes": stats.dispatch_bytes,
        "combine_bytes": stats.combine_bytes,
        "tokens_to_rank": plan_dispatch(flat_ids, placement).send_counts.tolist(),
    }


@pytest.mark.parametrize("world, skew", [(2, 0.0), (4, 0.0), (2, 0.1)])
def test_all_to_all_dispatch_equals_the_single_device_layer(world, skew):
    results = spawn_gloo(_dispatch_case, world, (False, skew), timeout_s=120)
    for rank, r in results.items():
        assert r["out"] <= 1e-6, (rank, r)
        assert r["x_grad"] <= 1e-6, (rank, r)
        assert r["gate_grad"] <= 1e-5, (rank, r)  # the gate weights travel with autograd
        for name, diff in r["expert_grads"].items():
            assert diff <= 1e-5, (rank, name, diff)
        # each (token, rank) pair once: fewer rows than (token, expert) pairs, exactly the unique ones
        assert r["rank_sum"] == r["pairs"] < r["pairs_with_repeats"], r
        assert r["dispatch_bytes"] == r["pairs"] * HIDDEN * 4  # fp32 rows: compute dtype of this layer
    if skew:  # the skewed router sends most rows to EP rank 0, and parity still holds above
        to_rank = [sum(r["tokens_to_rank"][d] for r in results.values()) for d in range(world)]
        assert to_rank[0] > 3 * to_rank[1], to_rank


def test_fp8_dispatch_sends_e4m3_tiles_within_their_rounding_bound():
    results = spawn_gloo(_dispatch_case, 2, (True, 0.0), timeout_s=120)
    for r in results.values():
        # one byte per value and one exponent byte per 128-wide tile: 129 / 512 of the fp32 rows,
        # 129 / 256 = 0.504 of BF16 rows
        assert r["dispatch_bytes"] == r["pairs"] * (HIDDEN + HIDDEN // 128)
        # The only change is the rounding of the dispatched rows (gradients travel unquantised), so
        # the output moves by the rounding's effect through the experts: well under the e4m3 bound
        # (half an ulp, 2^-4 of each value) and far from zero
        assert 1e-6 < r["out"] < 2**-4, r
    # the combine returns every received pair in the compute dtype (fp32 here)
    pairs = sum(r["pairs"] for r in results.values())
    assert sum(r["combine_bytes"] for r in results.values()) == pairs * HIDDEN * 4


def test_token_compression_error_is_half_an_e4m3_ulp_of_the_tile():
    # The bound the FP8 dispatch test relies on. e4m3 keeps 3 mantissa bits, so rounding to nearest
    # errs by at most 2^-4 of a normal value. The power-of-two scale s puts the tile's amax / s in
    # (224, 448]; values below 2^-6 * s are subnormal, with steps of 2^-9 * s: an error of at most
    # 2^-10 * s < amax * 2^-10 / 224 < amax * 2^-17.
    x = torch.randn(64, 4 * 128, dtype=torch.float32) * torch.logspace(-3, 3, 64).unsqueeze(1)
    back = decompress_tokens(*compress_tokens(x), dtype=torch.float32)
    tiles, tiles_back = x.unflatten(-1, (4, 128)), back.unflatten(-1, (4, 128))
    amax = tiles.abs().amax(dim=-1, keepdim=True)
    error = (tiles_back - tiles).abs()
    assert torch.all(error <= torch.maximum(tiles.abs() * 2**-4, amax * 2**-17))
    assert float(error.max()) > 0  # it does round


def test_placement_maps_experts_ranks_and_nodes():
    place = ExpertPlacement.with_ranks_per_node(n_experts=16, ep=4, ep_rank=2, ranks_per_node=2)
    assert place.local_experts == range(8, 12)
    assert place.rank_of_expert(torch.tensor([0, 3, 4, 15])).tolist() == [0, 0, 1, 3]
    assert place.nodes == (0, 0, 1, 1) and place.num_nodes == 2
    assert place.node_limited(n_group=2) and not place.node_limited(n_group=4)
    # node ids as Ray reports them, numbered by first appearance along the EP group
    real = ExpertPlacement.from_node_ids(16, 0, ["b", "b", "a", "a"])
    assert real.nodes == (0, 0, 1, 1) and real.node_limited(2)
    assert not ExpertPlacement.from_node_ids(16, 0, ["a", "b", "a", "b"]).node_limited(2)


def test_expert_shard_group_holds_the_same_experts():
    topo = Topology.for_schedule("dualpipe", pp=2, dp=4, ep=2)
    # rank = dp_rank * pp + pp_rank; EP rank = dp_rank % ep; the DualPipe pair holds the same experts
    assert topo.ep_group(0) == [0, 2] and topo.ep_group(4) == [4, 6]
    assert topo.shard_group(0) == list(range(8))
    assert topo.expert_shard_group(0) == [0, 1, 4, 5]
    assert topo.expert_shard_group(2) == [2, 3, 6, 7]
    assert Topology.for_schedule("1f1b", pp=1, dp=2, ep=1).expert_shard_group(0) == [0, 1]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"dp": 2, "ep": 4}, "parallel.ep: must divide dp=2, got 4"),
        ({"dp": 6, "ep": 3}, "parallel.ep: model.n_routed_experts (8) must be divisible by ep (3)"),
        ({"dp": 4, "ep": 4, "ep_ranks_per_node": 3}, "parallel.ep_ranks_per_node: must divide ep=4, got 3"),
    ],
)
def test_bad_expert_parallel_layout_fails_before_launch(tmp_path, changes, message):
    raw = pipeline_config(tmp_path, "1f1b", 1, 1, 2, 0)
    raw["parallel"].update(changes)
    raw["data"]["global_batch"] = 48
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict(raw)
    assert str(err.value) == message
