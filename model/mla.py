"""Multi-head Latent Attention (DeepSeek-V2/V3).

Keys and values are generated from one low-rank latent c_kv = RMSNorm(W_dkv x) of width kv_lora_rank,
plus a single rotary key k_rope of width qk_rope_head_dim shared by every head. Queries optionally go
through their own low-rank latent (q_lora_rank). Two equivalent ways to attend:

* training path: expand the latent to per-head keys/values with kv_b_proj, then ordinary causal
  softmax attention (scaled_dot_product_attention);
* absorbed (inference) path: the cache holds only c_kv and k_rope; kv_b_proj's key half is folded
  into the query and its value half into the output, so per-head keys/values are never materialised.
  This is what makes MLA's KV cache kv_lora_rank + qk_rope_head_dim wide per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from moeforge.model.config import ModelConfig
from moeforge.model.norm import RMSNorm
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
        Run together, an FP8 policy quantizes x once for both (kernels/shared_quant.py)."""
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
        return q_nope, apply_rotary(q_rope, cos, sin)

    def _latent(
        self, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """From kv_a(x) [b, s, r + rope]: (normed latent [b, s, kv_lora_rank], rotated shared key [b, s, rope])."""
        latent, k_rope = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_rope = apply_rotary(k_rope.unsqueeze(2), cos, sin).squeeze(2)  # [b, s, 1, rope] -> [b, s, rope]
        return self.kv_a_layernorm(latent), k_rope

    # --- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: LatentCache | None = None) -> torch.Tensor:
        """x [b, s, hidden] at positions start_pos..start_pos+s-1 -> [b, s, hidden].

        Without a cache: the training path over positions 0..s-1 (start_pos must be 0).
        With a cache: writes this chunk's latent into it and attends, absorbed, over all cached
        positions < start_pos + s (prefill and incremental decoding).
        """
        b, s, _ = x.shape
        cos, sin = self.rotary(start_pos, s, x.device)
        q, kv = self._project_input(x)
        if cache is None:
            if start_pos != 0:
                raise ValueError("MLA: start_pos > 0 needs a LatentCache holding the earlier positions")
            out = self.attend(q, kv, cos, sin)
        else:
            q_nope, q_rope = self._queries(q, cos, sin)
            latent, k_rope = self._latent(kv, cos, sin)
            end = start_pos + s
            if end > cache.latent.shape[1]:
                raise ValueError(f"MLA: position {end} exceeds the cache length {cache.latent.shape[1]}")
            cache.latent[:b, start_pos:end] = latent.to(cache.latent.dtype)
            cache.k_rope[:b, start_pos:end] = k_rope.to(cache.k_rope.dtype)
            out = self._attend_absorbed(
                q_nope, q_rope, cache.latent[:b, :end], cache.k_rope[:b, :end], start_pos
            )
        return self.o_proj(out.flatten(2))  # [b, s, h * v] -> [b, s, hidden]

    def attend(self, q: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Training path from the input projections q_a(x) (or q(x)) and kv_a(x) to the attention
        output [b, s, h, v]: latent norms, up-projections, rotary and attention. One method, so a
        memory policy applied from outside can recompute all of it but the attention core in
        backward (DeepSeek-V3 recomputes the MLA up-projections and norms)."""
        q_nope, q_rope = self._queries(q, cos, sin)
        latent, k_rope = self._latent(kv, cos, sin)
        return self._attend_expanded(q_nope, q_rope, latent, k_rope)

    def _attend_expanded(self, q_nope, q_rope, latent, k_rope) -> torch.Tensor:
        """Training path: per-head keys/values from the latent; returns [b, s, h, v]."""
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
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=True,
            scale=self.softmax_scale,
        )
        return out.transpose(1, 2)[..., : self.v_dim]  # [b, s, h, v]

    def _attend_absorbed(self, q_nope, q_rope, latent, k_rope, start_pos: int) -> torch.Tensor:
        """Inference path over cached latent [b, t, r] and k_rope [b, t, rope]; returns [b, s, h, v]."""
        w = self.kv_b_proj.weight.unflatten(0, (self.n_heads, self.nope_dim + self.v_dim))  # [h, nope+v, r]
        w_k, w_v = w[:, : self.nope_dim], w[:, self.nope_dim :]  # [h, nope, r], [h, v, r]
        q_latent = torch.einsum("bshd,hdr->bshr", q_nope, w_k)  # query in latent space
        scores = torch.einsum("bshr,btr->bsht", q_latent, latent) + torch.einsum(
            "bshd,btd->bsht", q_rope, k_rope
        )
        scores = scores.float() * self.softmax_scale
        s, t = scores.shape[1], scores.shape[3]
        query_pos = torch.arange(start_pos, start_pos + s, device=scores.device)
        future = torch.arange(t, device=scores.device)[None, :] > query_pos[:, None]  # [s, t]
        scores = scores.masked_fill(future[None, :, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).to(latent.dtype)  # [b, s, h, t]
        out_latent = torch.einsum("bsht,btr->bshr", probs, latent)
        return torch.einsum("bshr,hvr->bshv", out_latent, w_v)  # [b, s, h, v]
