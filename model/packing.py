"""Packed rows: several documents in one row, told apart by a segment id per token.

A row's documents are its maximal runs of equal segment ids (`segments` [b, s], one id per input
position). Within a packed row, attention stays inside each document (block-diagonal causal) and
positions restart at 0 at each document's first token, so a document trains exactly as it would
alone at the start of a row. The model's attention (`model.mla.MLA`) and its MTP targets
(`model.transformer.mtp_targets`) read these; nothing here knows where the segments came from.
"""

from __future__ import annotations

import torch


def document_starts(segments: torch.Tensor) -> torch.Tensor:
    """segments [b, s] -> bool [b, s]: True where a document begins (position 0, or a change of id)."""
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return starts


def document_index(segments: torch.Tensor) -> torch.Tensor:
    """segments [b, s] -> int64 [b, s]: each position's document, counted 0, 1, ... along its row.
    Two positions of a row are in the same document iff their indices are equal (a segment id that
    comes back after another id starts a new document)."""
    return document_starts(segments).long().cumsum(dim=1) - 1


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """segments [b, s] -> int64 [b, s]: each token's position within its document (0 at its start)."""
    t = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)  # [b, s]
    first = torch.where(document_starts(segments), t, 0).cummax(dim=1).values  # [b, s]: its document's start
    return t - first


def segment_attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """segments [b, s] -> bool [b, 1, s, s]: True where query q may attend key k (same document,
    k <= q); the head dimension broadcasts."""
    doc = document_index(segments)
    s = segments.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segments.device).tril()  # [s, s]
    same = doc[:, :, None] == doc[:, None, :]  # [b, s (query), s (key)]
    return (same & causal)[:, None]  # [b, 1, s, s]
