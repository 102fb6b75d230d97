"""Multi-head Latent Attention (DeepSeek-V2/V3).

Keys and values are generated from one low-rank latent c_kv = RMSNorm(W_dkv x) of width kv_lora_rank,
plus a single rotary key k_rope of width qk_rope_head_dim shared by every head. Queries optionally go
through their own low-rank latent (q_lora_rank). Two equivalent ways to attend:

* training path: expand the latent to per-head keys/values with kv_b_proj, then ordinary causal
  softmax attention (scaled_dot_product_attention); with `segments` (packed rows,
  `model.packing.segment_attention_mask`) the attention is block-diagonal causal through a boolean mask
  and each document's positions restart at 0;
* absorbed (inference) path: the cache holds only c_kv and k_rope; kv_b_proj's key half is folded
  into the query and its value half into the output, so per-head keys/values are never materialised.
  This is what makes MLA's KV cache kv_lora_rank + qk_rope_head_dim wide per token.

The cached path takes the chunk's start position either as one int for the whole batch (one RoPE
offset, one contiguous cache write, one causal mask) or as a LongTensor [b] of per-row starts, so rows
at different positions (ragged prompts, rows that accepted different numbers of speculative drafts)
share one forward: row i's tokens sit at positions start[i] .. start[i]+s-1, are written there in its
cache row, and a query at absolute position p attends that row's cache entries <= p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from moeforge.model.config import ModelConfig
from moeforge.model.norm import RMSNorm
from moeforge.model.packing import segment_attention_mask, segment_positions
from moeforge.model.rope import RotaryEmbedding, apply_rotary
from torch import nn

# The latent norms use a fixed eps in the published model (not rms_norm_eps).
_LATENT_NORM_EPS = 1e-6


@dataclass
class LatentCache:
    """One layer's inference cache: the normed KV latent and the rotated shared key, per position."""

    latent: torch.Tensor  # [batch, max_len, kv_lora_rank]
    k_rope: torch.Tensor  # [batch, max_len, qk_rope_head_dim]

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=None) -> LatentCache:
        return cls(
            latent=torch.zeros(batch, max_len, cfg.kv_lora_rank, device=device, dtype=dtype),
            k_rope=torch.zeros(batch, max_len, cfg.qk_rope_head_dim, device=device, dtype=dtype),
        )


class MLA(nn.Module):
    """Multi-head Latent Attention; linear names follow the Hugging Face checkpoint."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.qk_dim = cfg.qk_head_dim
        self.softmax_scale = cfg.softmax_scale
        self.dropout = cfg.attention_dropout
        dim, bias = cfg.hidden_size, cfg.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(dim, self.n_heads * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(dim, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, _LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.n_heads * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, _LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, dim, bias=bias)
        self.rotary = RotaryEmbedding(cfg)

    # --- shared pieces ---------------------------------------------------------------------------
    def _project_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two projections of the block input, back to back: (q_a(x) or q(x), kv_a(x)).
        Run together, an FP8 policy quantizes x once for both (`kernels.shared_quant.shared_quantization`)."""
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_a_proj(x)
        return q, self.kv_a_proj_with_mqa(x)

    def _queries(
        self, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """From q(x) or q_a(x): (q_nope [b, s, h, nope], q_rope [b, s, h, rope]), rotary on q_rope."""
        if self.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.unflatten(-1, (self.n_heads, self.qk_dim))  # [b, s, h, qk]
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, _rotate(q_rope, cos, sin)

    def _latent(
        self, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """From kv_a(x) [b, s, r + rope]: (normed latent [b, s, kv_lora_rank], rotated shared key [b, s, rope])."""
        latent, k_rope = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_rope = _rotate(k_rope.unsqueeze(2), cos, sin).squeeze(2)  # [b, s, 1, rope] -> [b, s, rope]
        return self.kv_a_layernorm(latent), k_rope

    # --- forward -------------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        start_pos: int | torch.Tensor = 0,
        cache: LatentCache | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [b, s, hidden] at positions start_pos..start_pos+s-1 -> [b, s, hidden].

        Without a cache: the training path over positions 0..s-1 (start_pos must be the int 0).
        With a cache: writes this chunk's latent into it and attends, absorbed, over the cached
        positions <= each query's position (prefill and incremental decoding). `start_pos` is one int
        for the whole batch, or a LongTensor [b] of per-row start positions (see the module docstring).
        With `segments` [b, s] (packed rows; training path only): a query attends the keys of its own
        document at or before it, and positions restart at 0 at each document
        (`model.packing.segment_positions`).
        """
        b, s, _ = x.shape
        q, kv = self._project_input(x)
        if segments is not None:
            if cache is not None or isinstance(start_pos, torch.Tensor) or start_pos != 0:
                raise ValueError("MLA: segments are for the training path (no cache, start_pos 0)")
            cos, sin = self.rotary(0, s, x.device)  # [s, rope / 2] each: the table for positions 0..s-1
            positions = segment_positions(segments)  # [b, s]
            cos, sin = cos[positions], sin[positions]  # [b, s, rope / 2]: each token's own position
            out = self.attend(q, kv, cos, sin, segment_attention_mask(segments))
            return self.o_proj(out.flatten(2))  # [b, s, h * v] -> [b, s, hidden]
        if isinstance(start_pos, torch.Tensor):
            if cache is None:
                raise ValueError("MLA: per-row start positions need a LatentCache")
            out = self._cached_per_row(q, kv, start_pos, cache)
            return self.o_proj(out.flatten(2))  # [b, s, h * v] -> [b, s, hidden]
        cos, sin = self.rotary(start_pos, s, x.device)
        if cache is None:
            if start_pos != 0:
                raise ValueError("MLA: start_pos > 0 needs a LatentCache holding the earlier positions")
            out = self.attend(q, kv, cos, sin)
        else:
            q_nope, q_rope = self._queries(q, cos, sin)
            latent, k_rope = self._latent(kv, cos, sin)
            end = start_pos + s
            if start_pos < 0 or end > cache.latent.shape[1]:
                raise ValueError(
                    f"MLA: positions {start_pos}..{end - 1} are outside the cache length {cache.latent.shape[1]}"
                )
            cache.latent[:b, start_pos:end] = latent.to(cache.latent.dtype)
            cache.k_rope[:b, start_pos:end] = k_rope.to(cache.k_rope.dtype)
            query_pos = torch.arange(start_pos, end, device=x.device)[None]  # [1, s]: the same for every row
            out = self._attend_absorbed(
                q_nope, q_rope, cache.latent[:b, :end], cache.k_rope[:b, :end], query_pos
            )
        return self.o_proj(out.flatten(2))  # [b, s, h * v] -> [b, s, hidden]

    def _cached_per_row(
        self, q: torch.Tensor, kv: torch.Tensor, start_pos: torch.Tensor, cache: LatentCache
    ) -> torch.Tensor:
        """The cached path with per-row starts start_pos [b]: returns the attention output [b, s, h, v]."""
        b, s = q.shape[:2]
        if start_pos.shape != (b,) or start_pos.dtype != torch.long:
            raise ValueError(
                f"MLA: per-row start_pos must be a LongTensor [{b}], got {start_pos.dtype} {tuple(start_pos.shape)}"
            )
        max_len = cache.latent.shape[1]
        positions = start_pos.to(q.device)[:, None] + torch.arange(s, device=q.device)[None]  # [b, s]
        # one host sync: the table length and the attended cache length are python ints
        lo, end = int(start_pos.min()), int(positions[:, -1].max()) + 1
        if lo < 0 or end > max_len:
            raise ValueError(f"MLA: positions {lo}..{end - 1} are outside the cache length {max_len}")
        cos, sin = self.rotary(0, end, q.device)  # [end, rope / 2] each: the table for positions 0..end-1
        cos, sin = cos[positions], sin[positions]  # [b, s, rope / 2]: each row's own positions
        q_nope, q_rope = self._queries(q, cos, sin)
        latent, k_rope = self._latent(kv, cos, sin)
        rows = torch.arange(b, device=q.device)[:, None].expand(b, s)  # [b, s]: the cache row of each token
        cache.latent.index_put_((rows, positions), latent.to(cache.latent.dtype))
        cache.k_rope.index_put_((rows, positions), k_rope.to(cache.k_rope.dtype))
        return self._attend_absorbed(
            q_nope, q_rope, cache.latent[:b, :end], cache.k_rope[:b, :end], positions
        )

    def attend(
        self,
        q: torch.Tensor,
        kv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Training path from the input projections q_a(x) (or q(x)) and kv_a(x) to the attention
        output [b, s, h, v]: latent norms, up-projections, rotary and attention. One method, so a
        memory policy applied from outside can recompute all of it but the attention core in
        backward (DeepSeek-V3 recomputes the MLA up-projections and norms). cos/sin are [s, rope/2]
        (every row at positions 0..s-1) or [b, s, rope/2] (per-token positions); `mask` bool
        [b, 1, s, s] (True: attend) replaces the causal mask, None keeps it."""
        q_nope, q_rope = self._queries(q, cos, sin)
        latent, k_rope = self._latent(kv, cos, sin)
        return self._attend_expanded(q_nope, q_rope, latent, k_rope, mask)

    def _attend_expanded(self, q_nope, q_rope, latent, k_rope, mask: torch.Tensor | None = None):
        """Training path: per-head keys/values from the latent; returns [b, s, h, v]. Causal
        attention, or `mask`'s (bool [b, 1, s, s]) when given."""
        kv = self.kv_b_proj(latent)  # [b, s, h * (nope + v)]
        kv = kv.unflatten(-1, (self.n_heads, self.nope_dim + self.v_dim))  # [b, s, h, nope + v]
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_rope.unsqueeze(2).expand_as(q_rope)), dim=-1)  # [b, s, h, qk]
        q = torch.cat((q_nope, q_rope), dim=-1)  # [b, s, h, qk]
        # Values zero-padded to the query/key width: fused (flash) attention kernels need one head
        # width, and without them attention falls back to a path that saves the FP32 [s, s] scores
        # for backward. The padded output columns are zero and sliced off.
        if self.v_dim < self.qk_dim:
            v = F.pad(v, (0, self.qk_dim - self.v_dim))  # [b, s, h, qk]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),  # [b, h, s, qk]
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None,
            scale=self.softmax_scale,
        )
        return out.transpose(1, 2)[..., : self.v_dim]  # [b, s, h, v]

    def _attend_absorbed(self, q_nope, q_rope, latent, k_rope, query_pos: torch.Tensor) -> torch.Tensor:
        """Inference path over cached latent [b, t, r] and k_rope [b, t, rope]; returns [b, s, h, v].
        query_pos [b or 1, s]: each query's absolute position; it attends cache entries <= it."""
        w = self.kv_b_proj.weight.unflatten(0, (self.n_heads, self.nope_dim + self.v_dim))  # [h, nope+v, r]
        w_k, w_v = w[:, : self.nope_dim], w[:, self.nope_dim :]  # [h, nope, r], [h, v, r]
        q_latent = torch.einsum("bshd,hdr->bshr", q_nope, w_k)  # query in latent space
        scores = torch.einsum("bshr,btr->bsht", q_latent, latent) + torch.einsum(
            "bshd,btd->bsht", q_rope, k_rope
        )
        scores = scores.float() * self.softmax_scale
        t = scores.shape[3]
        future = (
            torch.arange(t, device=scores.device)[None, None, :] > query_pos[:, :, None]
        )  # [b or 1, s, t]
        scores = scores.masked_fill(future[:, :, None, :], float("-inf"))  # broadcast over heads
        probs = scores.softmax(dim=-1).to(latent.dtype)  # [b, s, h, t]
        out_latent = torch.einsum("bsht,btr->bshr", probs, latent)
        return torch.einsum("bshr,hvr->bshv", out_latent, w_v)  # [b, s, h, v]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary for x [b, s, heads, dim] with cos/sin either [s, dim/2] (every row at the same
    positions) or [b, s, dim/2] (per-row positions)."""
    if cos.dim() == 2:
        return apply_rotary(x, cos, sin)
    flat = x.flatten(0, 1).unsqueeze(0)  # [1, b * s, heads, dim]: one "row" whose positions are all tokens'
    rotated = apply_rotary(flat, cos.flatten(0, 1), sin.flatten(0, 1))  # cos/sin [b * s, dim/2]
    return rotated.reshape(x.shape)  # [b, s, heads, dim]
