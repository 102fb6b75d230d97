"""Writing packed rows as shards of whole rows, and the progress record of a packed preparation.

A shard of packed rows is three files of equal token count, written atomically in the order loss
mask, segments, token ids, then recorded together: `train/00000.loss_mask.bin` (uint8),
`train/00000.segments.bin` (uint8/uint16/uint32, see packing.segment_dtype) and `train/00000.bin`.
Shards hold whole rows, so the first row after the finished shards is a row boundary, and the
progress record keeps, per split, the position of that row's first document (`resume`): a re-run
re-packs from there with an empty packer and gets the same rows (`packing.RowPacker`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from moeforge.platform.data.packing import PackedRow, Position
from moeforge.platform.data.shards import EXTRA_STREAMS
from moeforge.platform.data.writer import SPLITS, Progress, shard_name, write_shard
from moeforge.platform.outputs.storage import Storage


def stream_shard_name(split: str, index: int, stream: str) -> str:
    """train/00000.bin for token ids, train/00000.loss_mask.bin and train/00000.segments.bin beside it."""
    return shard_name(split, index).removesuffix(".bin") + f".{stream}.bin"


class RowWriter:
    """Buffers one split's packed rows and writes each full shard of `shard_rows` rows as it fills.

    `shards` (token ids) and `streams[name]` are the entries written so far (continuing `done_*`);
    after each shard `resume` is where the first row not in a finished shard begins: the first
    buffered row's start, or `pending_start()` (the packer's) when none is buffered."""

    def __init__(
        self,
        storage: Storage,
        split: str,
        dtypes: dict[str, str],  # "tokens", "loss_mask", "segments" -> shard dtype
        shard_rows: int,
        pending_start: Callable[[], Position],
        done_tokens: list[dict] | None = None,
        done_streams: dict[str, list[dict]] | None = None,
        on_shard: Callable[[str, dict], None] | None = None,
    ) -> None:
        self.storage, self.split, self.dtypes, self.shard_rows = storage, split, dtypes, shard_rows
        self.pending_start = pending_start
        self.shards: list[dict] = list(done_tokens or [])
        self.streams: dict[str, list[dict]] = {s: list((done_streams or {}).get(s, [])) for s in EXTRA_STREAMS}
        self.on_shard = on_shard
        self.resume: Position | None = None
        self._rows: list[PackedRow] = []

    def add(self, rows: list[PackedRow]) -> None:
        self._rows.extend(rows)  # all of them first: `resume` may be the start of a later one
        while len(self._rows) >= self.shard_rows:
            self._write(self._rows[: self.shard_rows])
            self._rows = self._rows[self.shard_rows :]

    def close(self) -> None:
        """Write the last, partial shard."""
        if self._rows:
            self._write(self._rows)
            self._rows = []

    def _write(self, rows: list[PackedRow]) -> None:
        index = len(self.shards)
        first = sum(s["num_tokens"] for s in self.shards)
        mask = np.concatenate([r.loss_mask for r in rows])
        for stream, values in (("loss_mask", mask), ("segments", np.concatenate([r.segments for r in rows]))):
            entry = write_shard(self.storage, stream_shard_name(self.split, index, stream), values,
                                self.dtypes[stream], first)
            if stream == "loss_mask":
                entry["trained_tokens"] = int(mask.sum())
            self.streams[stream].append(entry)
        tokens = np.concatenate([r.tokens for r in rows])
        entry = write_shard(self.storage, shard_name(self.split, index), tokens, self.dtypes["tokens"], first)
        self.shards.append(entry)  # last: a recorded token shard has its mask and segments beside it
        self.resume = self._rows[len(rows)].start if len(self._rows) > len(rows) else self.pending_start()
        if self.on_shard is not None:
            self.on_shard(self.split, entry)


class PackedProgress(Progress):
    """Progress (`writer.Progress`) of a packed preparation: `file_tokens` per input file is [train tokens,
    val tokens, train docs, val docs, train truncated docs, val truncated docs] (packing-independent
    counts); `streams` are the extra streams' shards; `resume[split]` the position to re-pack from."""

    def __init__(self, fingerprint: str) -> None:
        super().__init__(fingerprint)
        self.streams: dict[str, dict[str, list[dict]]] = {s: {name: [] for name in EXTRA_STREAMS} for s in SPLITS}
        self.resume: dict[str, list[int]] = {s: [0, 0] for s in SPLITS}

    def state(self) -> dict:
        return {**super().state(), "streams": self.streams, "resume": self.resume}

    def restore(self, saved: dict) -> None:
        super().restore(saved)
        self.streams = {s: {name: saved["streams"][s][name] for name in EXTRA_STREAMS} for s in SPLITS}
        self.resume = {s: list(saved["resume"][s]) for s in SPLITS}

    def shards_intact(self, storage: Storage) -> bool:
        streams = [e for s in SPLITS for name in EXTRA_STREAMS for e in self.streams[s][name]]
        return super().shards_intact(storage) and all(storage.size(e["path"]) == e["bytes"] for e in streams)

    def restart(self) -> tuple[int, dict[str, Position]]:
        """(first input file to encode again, per split the position to re-pack from); forgets the
        counts of the files from that one on (they are counted again)."""
        resume = {s: (int(self.resume[s][0]), int(self.resume[s][1])) for s in SPLITS}
        first = min(position[0] for position in resume.values())
        self.file_tokens = self.file_tokens[:first]
        return first, resume
