"""Reading a conversations manifest's split as whole rows: token ids, loss mask and segments.

Row r of a split is tokens [r * (seq_len + 1), (r + 1) * (seq_len + 1)) of each of its three
streams (`packed_writer.RowWriter` writes them side by side, shards of whole rows); rows are read whole,
never as windows at another stride.
"""

from __future__ import annotations

import numpy as np
from moeforge.platform.data.shards import EXTRA_STREAMS, ShardError, TokenStream


class PackedRows:
    """Rows [first, first + count) of a split's packed streams."""

    def __init__(self, streams: dict[str, TokenStream], row_len: int, first: int = 0, count: int | None = None):
        self.streams, self.row_len, self.first = streams, row_len, first
        self.count = streams["tokens"].num_tokens // row_len - first if count is None else count

    @classmethod
    def from_prepared(cls, root: str, manifest: dict, split: str, hash_check: bool = True) -> PackedRows:
        """A split of a prepared conversations directory, every shard checked against the manifest."""
        row_len = int(manifest["seq_len"]) + 1
        streams = {"tokens": TokenStream.from_prepared(root, split, hash_check)}
        streams.update({name: TokenStream.from_prepared(root, split, hash_check, name) for name in EXTRA_STREAMS})
        sizes = {name: stream.num_tokens for name, stream in streams.items()}
        if len(set(sizes.values())) != 1 or sizes["tokens"] % row_len:
            raise ShardError(f"{root}: the {split} streams hold {sizes} tokens, not equal whole rows of {row_len}")
        return cls(streams, row_len)

    def part(self, first: int, count: int) -> PackedRows:
        """Rows [first, first + count) of these rows."""
        return PackedRows(self.streams, self.row_len, self.first + first, count)

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """{stream: int64 [len(indices), row_len]} for "tokens", "loss_mask" and "segments"."""
        out = {name: np.empty((len(indices), self.row_len), dtype=np.int64) for name in self.streams}  # [rows, row_len]
        for row, index in enumerate(indices):
            start = (self.first + int(index)) * self.row_len
            for name, stream in self.streams.items():
                out[name][row] = stream.read(start, self.row_len)
        return out
