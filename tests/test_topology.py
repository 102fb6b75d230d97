"""Topology: rank coordinates and the groups the runtime reduces over."""

from __future__ import annotations

import pytest
from moeforge.platform.config.builder import ConfigError
from moeforge.platform.engine.topology import Topology


def test_coords_roundtrip_and_stage_placement():
    topo = Topology.for_schedule("1f1b", pp=4, dp=2)
    assert [topo.coords(r) for r in range(8)] == [(p, d) for d in range(2) for p in range(4)]
    assert all(topo.rank_of(*topo.coords(r)) == r for r in range(8))
    assert topo.stages_of(2) == [2]
    dual = Topology.for_schedule("dualpipe", pp=4, dp=1)
    assert [dual.stages_of(r) for r in range(4)] == [[0, 3], [1, 2], [2, 1], [3, 0]]
    v = Topology.for_schedule("dualpipev", pp=4, dp=1)
    assert [v.stages_of(r) for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert v.num_stages == 8


def test_groups_linear():
    topo = Topology.for_schedule("1f1b", pp=4, dp=2, tied_embedding=True)
    assert topo.dp_group(5) == [1, 5]
    assert topo.shard_group(5) == [1, 5]
    assert topo.pipeline_group(5) == [4, 5, 6, 7]
    assert topo.norm_group(5) == [4, 5, 6, 7]
    assert topo.tie_group(4) == [4, 7] and topo.tie_group(7) == [4, 7] and topo.tie_group(5) is None


def test_groups_dualpipe_pairs_hold_the_same_stages():
    topo = Topology.for_schedule("dualpipe", pp=4, dp=2, tied_embedding=True)
    # rank 1 (pp 1, dp 0) and rank 2 (pp 2) both hold stages {1, 2}; with dp: ranks 5 and 6 too.
    assert topo.shard_group(1) == [1, 2, 5, 6]
    assert topo.shard_group(6) == [1, 2, 5, 6]
    assert sorted(topo.stages_of(1)) == sorted(topo.stages_of(2))
    # one member of every pair per norm group: pairs {0,3} and {1,2} counted once each
    assert topo.norm_group(0) == [0, 1] and topo.norm_group(3) == [2, 3] and topo.norm_group(6) == [6, 7]
    assert topo.tie_group(0) is None  # both ends of the model sit on rank 0
    # every norm group meets every shard group of its replica exactly once
    for rank in range(topo.world_size):
        norm = topo.norm_group(rank)
        shards = {tuple(topo.shard_group(r)) for r in norm}
        assert len(shards) == topo.pp // 2


def test_all_groups_cover_every_rank_once_per_kind():
    topo = Topology.for_schedule("dualpipe", pp=4, dp=2, ep=2)
    groups = topo.all_groups()
    for kind in ("pipeline", "dp", "shard", "norm", "ep"):
        members = sorted(r for g in groups[kind] for r in g)
        assert members == list(range(8)), kind
    assert groups["tie"] == []
    assert topo.ep_group(4) == [0, 4]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"schedule": "dualpipe", "pp": 3, "dp": 1}, "parallel.pp"),
        ({"schedule": "1f1b", "pp": 2, "dp": 3, "ep": 2}, "parallel.ep"),
    ],
)
def test_bad_topology_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        Topology.for_schedule(**kwargs)
