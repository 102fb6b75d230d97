"""Training and validation batches: `BatchSource(data_cfg, vocab_size, seq_len)`.

Every sample is a window of seq_len + 1 tokens (inputs are [:-1], targets [1:]). The batch at an
optimizer step is a pure function of (data_cfg.seed, step): the global sample positions
[step * global_batch, (step + 1) * global_batch) go through the deterministic sampler, so a run
resumed from a checkpoint at step s sees exactly the batches it would have seen, at any dp size.

Sources:
- `synthetic`: a fixed, seeded sparse Markov chain (each of a few hundred "active" tokens has four
  possible successors with skewed probabilities). About 1.1 nats of entropy per token against
  ln(vocab) for uniform noise, so a tiny model's loss falls visibly within ~100 steps.
- `tokens`: a prepared shard directory (moeforge-prepare) or a single flat token file, read through
  memory maps. Windows are taken at stride seq_len, so each token is a target once per epoch.
- `tokens` on a directory of packed conversations (moeforge-prepare format=conversations): its rows
  are read whole (`packed_rows.PackedRows`), drawn by the same sampler, and a batch is a `PackedBatch` (token
  ids, loss mask, segments) of the same shape. The rows must have been packed for the model's seq_len.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from moeforge.platform.config.builder import ConfigError
from moeforge.platform.config.data import DataConfig
from moeforge.platform.data.cache import cached_tokens
from moeforge.platform.data.microbatches import PackedBatch
from moeforge.platform.data.packed_rows import PackedRows
from moeforge.platform.data.sampler import GlobalSampler
from moeforge.platform.data.shards import MANIFEST, TokenStream, dtype_for_vocab, read_manifest
from moeforge.platform.outputs.storage import S3Options, is_s3

_TRAIN, _VAL = 0, 1  # stream ids folded into the synthetic generator's seed

# Synthetic Markov chain shape: active tokens, successors per token and their probabilities.
_SYNTH_STATES = 512
_SYNTH_NEXT_PROBS = np.array([0.6, 0.2, 0.1, 0.1])


class SyntheticMarkov:
    """A seeded sparse Markov chain over a subset of the vocabulary; sample p of a stream is drawn
    from its own generator keyed by (seed, stream, p), so any sample is reproducible on its own."""

    def __init__(self, vocab_size: int, seed: int) -> None:
        rng = np.random.default_rng([seed, 0x5EED])
        states = min(vocab_size, _SYNTH_STATES)
        self.seed = seed
        self.token_of_state = rng.choice(vocab_size, size=states, replace=False).astype(np.int64)
        self.successors = rng.integers(0, states, size=(states, len(_SYNTH_NEXT_PROBS)))

    def samples(self, stream: int, positions: np.ndarray, length: int) -> np.ndarray:
        """[len(positions), length] token ids."""
        n_states, fanout = self.successors.shape
        first = np.empty(len(positions), dtype=np.int64)
        choices = np.empty((len(positions), length - 1), dtype=np.int64)
        for row, pos in enumerate(positions):
            rng = np.random.default_rng([self.seed, stream, int(pos)])
            first[row] = rng.integers(0, n_states)
            choices[row] = rng.choice(fanout, size=length - 1, p=_SYNTH_NEXT_PROBS)
        states = np.empty((len(positions), length), dtype=np.int64)  # [rows, length]
        states[:, 0] = first
        for t in range(1, length):
            states[:, t] = self.successors[states[:, t - 1], choices[:, t - 1]]
        return self.token_of_state[states]


class _Windows:
    """Samples [first, first + count) of a token stream, each seq_len + 1 tokens at stride seq_len."""

    def __init__(self, stream: TokenStream, seq_len: int, first: int = 0, count: int | None = None):
        self.stream, self.seq_len, self.first = stream, seq_len, first
        self.count = (stream.num_tokens - 1) // seq_len - first if count is None else count

    def rows(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)  # [rows, seq_len + 1]
        for row, index in enumerate(indices):
            out[row] = self.stream.read((self.first + int(index)) * self.seq_len, self.seq_len + 1)
        return out


def _refuse_text(local: str, path: str) -> None:
    """A flat token file holds raw token ids. A text file (JSONL, plain text) given in its place
    would be read as ids and train on noise, so its first bytes are looked at: UTF-8 without NUL
    bytes, nearly all printable, is text."""
    with open(local, "rb") as f:
        head = f.read(1 << 16)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 4:  # not just a character cut at the end of the sample
            return
        text = head[: err.start].decode("utf-8")
    if not text or "\x00" in text:
        return
    printable = sum(ch.isprintable() or ch in "\n\r\t" for ch in text)
    if printable >= 0.98 * len(text):
        kind = "JSONL" if text.lstrip().startswith("{") else "text"
        raise ConfigError(
            f"data.path: {path} is {kind}, not token ids: tokenize it with moeforge-prepare "
            "'inputs=[<file>]' output=<dir>, and give that directory"
        )


class BatchSource:
    """Deterministic batches of token windows for training (`batch`) and validation (`val_batch`).

    Both return a LongTensor [global_batch // dp_size, seq_len + 1] (a PackedBatch of that shape on
    packed conversations): with the defaults (dp_rank=0, dp_size=1) the whole global batch; with a
    dp rank, that rank's contiguous slice."""

    def __init__(self, data_cfg: DataConfig, vocab_size: int, seq_len: int) -> None:
        if seq_len < 1:
            raise ConfigError(f"seq_len: must be >= 1, got {seq_len}")
        self.cfg, self.vocab_size, self.seq_len = data_cfg, vocab_size, seq_len
        self.global_batch = data_cfg.global_batch
        self._synthetic: SyntheticMarkov | None = None
        self._train: _Windows | PackedRows | None = None
        self._val: _Windows | PackedRows | None = None
        self.packed = False  # rows of packed conversations: batches are PackedBatch
        if data_cfg.source == "synthetic":
            self._synthetic = SyntheticMarkov(vocab_size, data_cfg.seed)
            self.num_samples: int | None = None  # unbounded
            self.has_val = True
        else:
            self._open_tokens(data_cfg.path)
            self.num_samples = self._train.count
            self.has_val = self._val is not None and self._val.count > 0
            self._train_sampler = GlobalSampler(self._train.count, data_cfg.seed, shuffle=True)
            if self.has_val:
                self._val_sampler = GlobalSampler(self._val.count, data_cfg.seed, shuffle=False)

    def _open_tokens(self, path: str) -> None:
        local = path
        if is_s3(path):
            try:
                local = cached_tokens(path, self.cfg.cache_dir, S3Options(endpoint_url=self.cfg.endpoint_url))
            except FileNotFoundError as err:
                raise ConfigError(f"data.path: {err}") from None
        if os.path.isdir(local) and os.path.isfile(os.path.join(local, MANIFEST)):
            manifest = read_manifest(local)
            if manifest["vocab_size"] > self.vocab_size:
                raise ConfigError(
                    f"data.path: {path} was tokenized with vocab_size {manifest['vocab_size']}, "
                    f"larger than the model's {self.vocab_size}"
                )
            hash_check = self.cfg.verify == "sha256"
            if manifest.get("kind") == "conversations":
                self._open_packed(local, path, manifest, hash_check)
                return
            train = TokenStream.from_prepared(local, "train", hash_check)
            val = TokenStream.from_prepared(local, "val", hash_check)
            self._split(train, val if val.num_tokens > self.seq_len else None)
        elif os.path.isdir(local):
            raise ConfigError(f"data.path: {path} is a directory without {MANIFEST} (run moeforge-prepare)")
        elif os.path.isfile(local):
            _refuse_text(local, path)
            self._split(TokenStream.from_file(local, dtype_for_vocab(self.vocab_size)), None)
        else:
            raise ConfigError(f"data.path: {path} does not exist (prepare token shards with moeforge-prepare)")

    def _open_packed(self, local: str, path: str, manifest: dict, hash_check: bool) -> None:
        """Rows of packed conversations: the val split's, or a held-out tail of train's."""
        if manifest["seq_len"] != self.seq_len:
            raise ConfigError(
                f"data.path: {path} holds conversations packed for seq_len {manifest['seq_len']}, but the "
                f"model's seq_len is {self.seq_len} (prepare again with seq_len={self.seq_len}, or set "
                f"model.seq_len={manifest['seq_len']})"
            )
        self.packed = True
        train = PackedRows.from_prepared(local, manifest, "train", hash_check)
        if train.count < 1:
            raise ConfigError(f"data.path: {path} holds no packed row in its train split")
        val = PackedRows.from_prepared(local, manifest, "val", hash_check)
        if val.count > 0:
            self._train, self._val = train, val
            return
        held_out = self._held_out(train.count)
        self._train = train.part(0, train.count - held_out)
        self._val = train.part(train.count - held_out, held_out) if held_out else None

    def _held_out(self, count: int) -> int:
        """How many of `count` samples data.val_fraction holds out (at least one when it is > 0 and
        more than one sample exists)."""
        held_out = int(count * self.cfg.val_fraction)
        if self.cfg.val_fraction > 0 and held_out == 0:
            held_out = 1 if count > 1 else 0
        return held_out

    def _split(self, train: TokenStream, val: TokenStream | None) -> None:
        """Train windows, and validation windows from the val split or the tail of train."""
        windows = _Windows(train, self.seq_len)
        if windows.count < 1:
            raise ConfigError(
                f"data.path: {self.cfg.path} holds {train.num_tokens} tokens, too few for one "
                f"sample of seq_len + 1 = {self.seq_len + 1}"
            )
        if val is not None:
            self._train, self._val = windows, _Windows(val, self.seq_len)
            return
        held_out = self._held_out(windows.count)
        self._train = _Windows(train, self.seq_len, 0, windows.count - held_out)
        self._val = _Windows(train, self.seq_len, windows.count - held_out, held_out) if held_out else None

    def _slice(self, step: int, dp_rank: int, dp_size: int) -> np.ndarray:
        if self.global_batch % dp_size:
            raise ValueError(f"global_batch {self.global_batch} is not divisible by dp size {dp_size}")
        per_rank = self.global_batch // dp_size
        start = step * self.global_batch + dp_rank * per_rank
        return np.arange(start, start + per_rank, dtype=np.int64)

    def _checked(self, rows: np.ndarray) -> torch.Tensor:
        top = int(rows.max())
        if top >= self.vocab_size:
            raise ValueError(f"data.path: token id {top} in {self.cfg.path} is >= vocab_size {self.vocab_size}")
        return torch.from_numpy(rows)

    def _packed_batch(self, rows: PackedRows, indices: np.ndarray) -> PackedBatch:
        streams = rows.rows(indices)
        return PackedBatch(
            tokens=self._checked(streams["tokens"]),
            loss_mask=torch.from_numpy(streams["loss_mask"] != 0),
            segments=torch.from_numpy(streams["segments"]),
        )

    def batch(self, step: int, dp_rank: int = 0, dp_size: int = 1) -> torch.Tensor | PackedBatch:
        """Training batch at optimizer step `step`: LongTensor [global_batch // dp_size, seq_len + 1],
        or a PackedBatch of that shape on packed conversations."""
        if self._synthetic is not None:
            positions = self._slice(step, dp_rank, dp_size)
            return torch.from_numpy(self._synthetic.samples(_TRAIN, positions, self.seq_len + 1))
        indices = self._train_sampler.rank_indices(step, self.global_batch, dp_rank, dp_size)
        if self.packed:
            return self._packed_batch(self._train, indices)
        return self._checked(self._train.rows(indices))

    def val_batch(self, i: int, dp_rank: int = 0, dp_size: int = 1) -> torch.Tensor | PackedBatch:
        """The i-th held-out batch, in a fixed order that wraps around the validation samples."""
        if self._synthetic is not None:
            positions = self._slice(i, dp_rank, dp_size)
            return torch.from_numpy(self._synthetic.samples(_VAL, positions, self.seq_len + 1))
        if not self.has_val:
            raise ConfigError(
                f"data.val_fraction: no held-out data in {self.cfg.path} (prepare a val split or set "
                "data.val_fraction > 0)"
            )
        indices = self._val_sampler.rank_indices(i, self.global_batch, dp_rank, dp_size)
        if self.packed:
            return self._packed_batch(self._val, indices)
        return self._checked(self._val.rows(indices))
