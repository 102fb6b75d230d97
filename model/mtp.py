"""Multi-token prediction (DeepSeek-V3): D sequential modules, each predicting one token further ahead.

Depth k at position i combines the previous depth's hidden state (the main model's last block output,
before the final norm, for k = 1) with the embedding of token i+k, and predicts token i+k+1 through
the main model's output head. The embedding and the head are shared with the main model, so an
MTPModule owns only its norms, its projection, one transformer block and its final norm.
"""

from __future__ import annotations

import torch
from moeforge.model.config import ModelConfig
from moeforge.model.mla import LatentCache
from moeforge.model.norm import RMSNorm
from torch import nn


class MTPModule(nn.Module):
    """h_k = Block(eh_proj([enorm(emb(t_{i+k})); hnorm(h_{k-1})])); logits = head(norm(h_k)).

    Embedding first in the concatenation, as in the published checkpoint. Names map to the checkpoint:
    enorm, hnorm, eh_proj, block (the usual block keys), norm (shared_head.norm)."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        from moeforge.model.transformer import Block  # Block lives with the main model

        self.layer_id = layer_id  # index in the checkpoint: num_hidden_layers + depth - 1
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = Block(cfg, layer_id)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        h_prev: torch.Tensor,
        next_emb: torch.Tensor,
        start_pos: int | torch.Tensor = 0,
        cache: LatentCache | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """h_prev, next_emb [b, s, hidden] -> this depth's hidden state [b, s, hidden] (before `norm`).

        `start_pos`/`cache` as in Block: with this depth's own LatentCache the block attends, absorbed,
        over the positions cached earlier (speculative drafting,
        `platform.inference.speculative.MTPDrafter`). `start_pos` may be a LongTensor [b] of per-row
        starts, so a batch of rows at different lengths drafts together. `segments` [b, s] (packed rows,
        training): the block attends inside each position's document, the main model's segments
        (position i's state belongs to position i's document)."""
        x = torch.cat((self.enorm(next_emb), self.hnorm(h_prev)), dim=-1)  # [b, s, 2 * hidden]
        return self.block(self.eh_proj(x), start_pos, cache, segments)
