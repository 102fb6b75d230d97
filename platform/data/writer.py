"""Writing fixed-size token shards, and the progress record that lets an interrupted run resume.

Each split's token stream is cut into shards of exactly `shard_tokens` tokens (the last one shorter).
A shard is written atomically (Storage.write_bytes), then `_progress.json` records it together with
how many tokens each input file contributed, so a re-run can skip the finished shards and restart
tokenization from the first file whose tokens are not all in them. `manifest.json`, written by the
caller after everything else, is the only completion marker.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import numpy as np
from moeforge.platform.data.shards import STREAM_DTYPES
from moeforge.platform.outputs.storage import Storage

PROGRESS = "_progress.json"
SPLITS = ("train", "val")


def shard_name(split: str, index: int) -> str:
    return f"{split}/{index:05d}.bin"


class SplitWriter:
    """Accumulates one split's tokens and writes each full shard as soon as it fills."""

    def __init__(
        self,
        storage: Storage,
        split: str,
        dtype: str,
        shard_tokens: int,
        done: list[dict] | None = None,
        on_shard: Callable[[str, dict], None] | None = None,
    ) -> None:
        self.storage, self.split, self.dtype, self.shard_tokens = storage, split, dtype, shard_tokens
        self.shards: list[dict] = list(done or [])
        self.on_shard = on_shard
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._skip = 0  # tokens at the head of the stream already inside finished shards

    @property
    def finished_tokens(self) -> int:
        return sum(s["num_tokens"] for s in self.shards)

    def skip(self, count: int) -> None:
        """Drop the next `count` tokens added (they are in shards a previous run finished)."""
        self._skip = count

    def add(self, tokens: np.ndarray) -> None:
        if self._skip:
            dropped = min(self._skip, len(tokens))
            tokens, self._skip = tokens[dropped:], self._skip - dropped
        if len(tokens):
            self._buffer.append(tokens)
            self._buffered += len(tokens)
        while self._buffered >= self.shard_tokens:
            stream = np.concatenate(self._buffer)
            self._write(stream[: self.shard_tokens])
            rest = stream[self.shard_tokens :]
            self._buffer, self._buffered = ([rest] if len(rest) else []), len(rest)

    def close(self) -> None:
        """Write the last, partial shard."""
        if self._buffered:
            self._write(np.concatenate(self._buffer))
            self._buffer, self._buffered = [], 0

    def _write(self, tokens: np.ndarray) -> None:
        entry = write_shard(self.storage, shard_name(self.split, len(self.shards)), tokens, self.dtype,
                            self.finished_tokens)
        self.shards.append(entry)
        if self.on_shard is not None:
            self.on_shard(self.split, entry)


def write_shard(storage: Storage, path: str, values: np.ndarray, dtype: str, first_token: int) -> dict:
    """Write `values` as one little-endian shard of `dtype` at `path`, atomically; return its
    manifest entry (path, first_token, num_tokens, bytes, sha256)."""
    data = values.astype(np.dtype(STREAM_DTYPES[dtype]).newbyteorder("<")).tobytes()  # little-endian on disk
    entry = {
        "path": path,
        "first_token": first_token,
        "num_tokens": len(values),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    storage.write_bytes(path, data)
    return entry


class Progress:
    """What a run has finished: shards per split and tokens per input file, under a fingerprint of
    everything that determines the output (a different fingerprint means start afresh)."""

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        self.file_tokens: list[list[int]] = []  # per input file: [train tokens, val tokens, train docs, val docs]
        self.shards: dict[str, list[dict]] = {s: [] for s in SPLITS}

    def state(self) -> dict:
        """What to_json saves (a subclass adds its own keys)."""
        return {"fingerprint": self.fingerprint, "file_tokens": self.file_tokens, "shards": self.shards}

    def restore(self, saved: dict) -> None:
        """Take back what state() saved (the fingerprint already matched)."""
        self.file_tokens = saved["file_tokens"]
        self.shards = {s: saved["shards"].get(s, []) for s in SPLITS}

    def to_json(self) -> str:
        return json.dumps(self.state())

    def save(self, storage: Storage) -> None:
        storage.write_text(PROGRESS, self.to_json())

    @classmethod
    def load(cls, storage: Storage, fingerprint: str) -> Progress | None:
        """The stored progress of an interrupted run with the same fingerprint, if any."""
        if not storage.exists(PROGRESS):
            return None
        try:
            saved = json.loads(storage.read_text(PROGRESS))
        except (ValueError, OSError):
            return None
        if saved.get("fingerprint") != fingerprint:
            return None
        progress = cls(fingerprint)
        progress.restore(saved)
        return progress

    def shards_intact(self, storage: Storage) -> bool:
        """Every recorded shard still exists with its recorded size."""
        return all(storage.size(s["path"]) == s["bytes"] for split in SPLITS for s in self.shards[split])

    def resume_point(self) -> tuple[int, dict[str, int]]:
        """(first input file to tokenize again, tokens of each split to drop from its re-tokenized
        stream because they already sit in finished shards)."""
        finished = {s: sum(e["num_tokens"] for e in self.shards[s]) for s in SPLITS}
        restart = len(self.file_tokens)
        for col, split in enumerate(SPLITS):
            total = 0
            for index, counts in enumerate(self.file_tokens):
                if total + counts[col] > finished[split]:  # this file's tokens run past the shards
                    restart = min(restart, index)
                    break
                total += counts[col]
        drop = {s: finished[s] - sum(c[col] for c in self.file_tokens[:restart]) for col, s in enumerate(SPLITS)}
        self.file_tokens = self.file_tokens[:restart]
        return restart, drop
