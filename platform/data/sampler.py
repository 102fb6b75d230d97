"""Deterministic sampler over the global sample index.

A run's data position is one number: how many samples it has consumed in total. Sample order is a
seeded pseudo-random permutation of [0, num_samples) per epoch, computed on the fly with a small
Feistel network (O(1) memory, so a billion-sample corpus needs no billion-entry permutation array).
Each optimizer step consumes `global_batch` consecutive positions; data-parallel rank r takes the
r-th contiguous slice of them. The global batch at a step therefore does not depend on the world
size, and a run can resume from its position at any dp size.
"""

from __future__ import annotations

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_ROUNDS = 4


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a cheap, well-mixed hash of uint64 values (wraps modulo 2**64)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


class FeistelPermutation:
    """A seeded bijection of [0, n). Balanced Feistel network on the smallest even-bit domain that
    holds n, with cycle walking to map back into [0, n) (the domain is < 4n, so few walks)."""

    def __init__(self, n: int, seed: int) -> None:
        if n < 1:
            raise ValueError(f"permutation size must be >= 1, got {n}")
        self.n = n
        bits = max(2, int(n - 1).bit_length())
        self.half_bits = (bits + 1) // 2
        self.half_mask = np.uint64((1 << self.half_bits) - 1)
        seeds = np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, n & 0xFFFFFFFF])
        self.keys = seeds.generate_state(_ROUNDS, dtype=np.uint64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half_bits)
        left, right = x >> shift, x & self.half_mask
        for key in self.keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.half_mask)
        return (left << shift) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        """Permuted positions for an array of indices in [0, n)."""
        x = np.asarray(index, dtype=np.uint64)
        if self.n == 1:
            return np.zeros_like(x, dtype=np.int64)
        out = self._encrypt(x)
        outside = out >= np.uint64(self.n)
        while outside.any():  # cycle walking: re-encrypt until inside [0, n); terminates (bijection)
            out[outside] = self._encrypt(out[outside])
            outside = out >= np.uint64(self.n)
        return out.astype(np.int64)


class GlobalSampler:
    """Maps a global position (samples consumed so far) to a sample index, epoch after epoch.

    `shuffle=False` keeps the natural order (used for validation)."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True) -> None:
        if num_samples < 1:
            raise ValueError(f"no samples to draw from (num_samples={num_samples})")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self._perm_epoch: int | None = None
        self._perm: FeistelPermutation | None = None

    def _permutation(self, epoch: int) -> FeistelPermutation:
        if self._perm_epoch != epoch:
            # A fresh order each epoch: the epoch is folded into the permutation's seed.
            self._perm = FeistelPermutation(self.num_samples, self.seed * 1_000_003 + epoch)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, start: int, count: int) -> np.ndarray:
        """Sample indices for global positions [start, start + count)."""
        positions = np.arange(start, start + count, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_samples)
        if not self.shuffle:
            return offsets
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self._permutation(int(epoch))(offsets[sel])
        return out

    def rank_indices(self, step: int, global_batch: int, dp_rank: int = 0, dp_size: int = 1) -> np.ndarray:
        """This dp rank's contiguous slice of the global batch at optimizer step `step`."""
        if global_batch % dp_size:
            raise ValueError(f"global_batch {global_batch} is not divisible by dp size {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        per_rank = global_batch // dp_size
        return self.indices(step * global_batch + dp_rank * per_rank, per_rank)
