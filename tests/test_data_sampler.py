"""The deterministic global sampler: a seeded permutation per epoch, dp slices, resumable position."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from moeforge.platform.data.sampler import FeistelPermutation, GlobalSampler


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5000), seed=st.integers(0, 2**40))
def test_feistel_is_a_permutation(n, seed):
    out = FeistelPermutation(n, seed)(np.arange(n))
    assert np.array_equal(np.sort(out), np.arange(n))


def test_order_depends_on_seed_and_epoch_only():
    a, b = GlobalSampler(1000, seed=5), GlobalSampler(1000, seed=5)
    assert np.array_equal(a.indices(0, 1000), b.indices(0, 1000))
    assert not np.array_equal(a.indices(0, 1000), GlobalSampler(1000, seed=6).indices(0, 1000))
    epoch0, epoch1 = a.indices(0, 1000), a.indices(1000, 1000)
    assert not np.array_equal(epoch0, epoch1) and np.array_equal(np.sort(epoch1), np.arange(1000))
    assert not np.array_equal(epoch0, np.arange(1000))  # shuffled
    assert np.array_equal(GlobalSampler(10, 5, shuffle=False).indices(7, 6), [7, 8, 9, 0, 1, 2])
    # any window of positions equals the same slice of one long read (no hidden state)
    assert np.array_equal(a.indices(990, 20), np.concatenate([epoch0[990:], epoch1[:10]]))


@pytest.mark.parametrize("dp", [1, 2, 3, 6])
def test_dp_ranks_cover_every_sample_exactly_once_per_epoch(dp):
    num_samples, global_batch = 60, 6
    sampler = GlobalSampler(num_samples, seed=11)
    seen = [sampler.rank_indices(step, global_batch, rank, dp)
            for step in range(num_samples // global_batch) for rank in range(dp)]
    flat = np.concatenate(seen)
    assert len(flat) == num_samples and np.array_equal(np.sort(flat), np.arange(num_samples))
    ranks = [set(np.concatenate(seen[r::dp]).tolist()) for r in range(dp)]
    assert all(not (ranks[i] & ranks[j]) for i in range(dp) for j in range(i + 1, dp))


def test_resuming_at_another_world_size_continues_the_same_stream():
    sampler = GlobalSampler(97, seed=3)  # not a multiple of the batch: steps straddle epochs
    for step in (0, 7, 16, 40):
        one = sampler.rank_indices(step, 12)
        assert np.array_equal(np.concatenate([sampler.rank_indices(step, 12, r, 4) for r in range(4)]), one)
        assert np.array_equal(np.concatenate([sampler.rank_indices(step, 12, r, 3) for r in range(3)]), one)
        assert np.array_equal(one, sampler.indices(step * 12, 12))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="no samples"):
        GlobalSampler(0, seed=1)
    with pytest.raises(ValueError, match="not divisible by dp size 5"):
        GlobalSampler(10, 1).rank_indices(0, 8, 0, 5)
    with pytest.raises(ValueError, match=r"dp_rank 2 outside \[0, 2\)"):
        GlobalSampler(10, 1).rank_indices(0, 8, 2, 2)
