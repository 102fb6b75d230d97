"""Greedy packing of documents into rows of exactly `row_len` tokens, in input order.

A document goes into the current row if it fits, else the row is closed and a new one starts with
it. A closed row's rest is padding: the pad id, loss mask 0, and a segment of its own. Segment k of
a row is its k-th document (k = 0, 1, ...). Documents are never split: each is at most row_len
tokens (conversations.fit_to_row cuts longer ones first).

Each document comes with its position (input file, index among that file's documents of the split),
and each row remembers the position of its first document: re-packing from that position with an
empty packer gives the same rows again, which is how an interrupted preparation resumes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Position = tuple[int, int]  # (input file index, document index within that file's split)


@dataclass(frozen=True)
class PackedRow:
    tokens: np.ndarray  # [row_len] int64
    loss_mask: np.ndarray  # [row_len] uint8
    segments: np.ndarray  # [row_len] int64
    start: Position  # where its first document is


def segment_dtype(row_len: int) -> str:
    """The smallest shard dtype that holds every segment index of a row (at most row_len segments)."""
    return "uint8" if row_len <= 1 << 8 else "uint16" if row_len <= 1 << 16 else "uint32"


class RowPacker:
    """Packs one split's documents into rows (see the module docstring)."""

    def __init__(self, row_len: int, pad_id: int, start: Position = (0, 0)) -> None:
        if row_len < 1:
            raise ValueError(f"row_len must be >= 1, got {row_len}")
        self.row_len, self.pad_id = row_len, pad_id
        self._docs: list[tuple[np.ndarray, np.ndarray]] = []
        self._fill = 0
        self._start: Position = start
        self._next: Position = start  # the position the next document will have, at the latest

    @property
    def pending_start(self) -> Position:
        """Where the first row not yet returned begins: its first document, or the next one to come."""
        return self._start if self._docs else self._next

    def add(self, tokens: np.ndarray, loss_mask: np.ndarray, position: Position) -> list[PackedRow]:
        """Add one document; returns the row it closed, if any."""
        if not 1 <= len(tokens) <= self.row_len or len(loss_mask) != len(tokens):
            raise ValueError(f"document of {len(tokens)} tokens ({len(loss_mask)} mask values) for rows of {self.row_len}")
        closed = [self._close()] if self._fill + len(tokens) > self.row_len else []
        if not self._docs:
            self._start = position
        self._docs.append((tokens, loss_mask))
        self._fill += len(tokens)
        self._next = (position[0], position[1] + 1)
        return closed

    def file_done(self, index: int) -> None:
        """Every document of input file `index` has been added."""
        self._next = max(self._next, (index + 1, 0))  # files before a resume point do not move it back

    def flush(self) -> list[PackedRow]:
        """Close the last, partly filled row (nothing when no document is pending)."""
        return [self._close()] if self._docs else []

    def _close(self) -> PackedRow:
        tokens = np.full(self.row_len, self.pad_id, dtype=np.int64)
        mask = np.zeros(self.row_len, dtype=np.uint8)
        segments = np.full(self.row_len, len(self._docs), dtype=np.int64)  # padding: a segment of its own
        pos = 0
        for k, (doc, doc_mask) in enumerate(self._docs):
            tokens[pos : pos + len(doc)] = doc
            mask[pos : pos + len(doc)] = doc_mask
            segments[pos : pos + len(doc)] = k
            pos += len(doc)
        row = PackedRow(tokens, mask, segments, self._start)
        self._docs, self._fill = [], 0
        return row
