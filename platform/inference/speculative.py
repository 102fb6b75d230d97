"""MTP speculative decoding: drafting with the MTP modules, and the acceptance rules.

Alignment (model/mtp.py, Transformer._head_and_loss): MTP depth k at position j reads the previous
depth's hidden state at j (depth 0 = the main model's last block output, before the final norm) and
the embedding of token t[j+k], and its logits head(norm(h_k[j])) predict t[j+k+1]. Its block attends
causally over positions <= j of its own sequence, so each depth keeps its own LatentCache indexed by
j, exactly as training lays the sequence out (the block's RoPE position is j, not j+k).

When drafting, the row holds N tokens t[0..N-1], the main model has processed t[0..N-2] (its hidden
states h_0[0..N-2] are known) and t[N-1] is the newest token, not yet fed. At the last main position
j = N-2:
    depth 1: h_0[N-2] + emb(t[N-1])    -> d_1, a guess of t[N]
    depth 2: h_1[N-2] + emb(d_1)       -> d_2, a guess of t[N+1]
    depth k: h_{k-1}[N-2] + emb(d_{k-1}) -> d_k, a guess of t[N+k-1]
The main model then verifies [t[N-1], d_1 .. d_n] in one forward at positions N-1 .. N-1+n: its
logits at position N-1+i are the target for d_{i+1}, and the one after the last accepted draft gives
the bonus (or correction) token.

Which MTP cache entries are still right: depth k's entry at j depends on t[j+k] and h_{k-1}[j]; both
are true (not drafted) iff j <= N-1-k. So after drafting, depth k is "valid" below N-k; the next
draft recomputes depth k from there (the hidden states it needs are kept in per-depth buffers), which
also overwrites everything built on a rejected draft. Nothing stale is ever attended, because a
query at j attends entries <= j only and every call rewrites its range from its valid length up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moeforge.model.mla import LatentCache
from moeforge.model.transformer import Transformer
from moeforge.platform.inference.sampling import greedy, sample_from


@dataclass
class Draft:
    """Drafted tokens d_1..d_n and, when sampling, the draft distributions they were drawn from."""

    tokens: list[int]
    probs: torch.Tensor | None  # [n, vocab] (None under greedy)


class MTPDrafter:
    """Per-row drafting state for one sequence (batch 1): a LatentCache and a valid length per MTP
    depth, and the hidden-state buffers h_0 .. h_{D-1} that the next depth reads.

    `hidden[0]` is filled by the caller from the main model (`record_main_hidden`); the rest is
    written here. Buffers are [1, max_len, hidden]: simple and exact, at the cost of D * hidden floats
    per position on top of the latent cache (fine for a reference decoder)."""

    def __init__(self, model: Transformer, max_len: int) -> None:
        cfg, ref = model.cfg, model.embed.weight
        self.model = model
        self.depths = len(model.mtp)
        self.caches = [LatentCache.empty(cfg, 1, max_len, ref.device, ref.dtype) for _ in range(self.depths)]
        self.hidden = [
            torch.zeros(1, max_len, cfg.hidden_size, device=ref.device, dtype=ref.dtype)
            for _ in range(self.depths)
        ]
        self.valid = [0] * self.depths  # depth k+1's cache entries below valid[k] are true

    def record_main_hidden(self, start: int, h: torch.Tensor) -> None:
        """Main-model hidden states h [1, s, hidden] for positions start .. start+s-1."""
        self.hidden[0][:, start : start + h.shape[1]] = h

    @torch.no_grad()
    def draft(self, tokens: torch.Tensor, sample_probs=None, generator=None) -> Draft:
        """Draft D tokens after `tokens` [N] (the whole row: prompt + generated; main model has
        processed tokens[:N-1]). `sample_probs` maps logits [vocab] -> probabilities (temperature >
        0); None drafts greedily."""
        n_tok = tokens.shape[0]
        last = n_tok - 2  # the last position the main model has a hidden state for
        ext = tokens
        drafted: list[int] = []
        probs: list[torch.Tensor] = []
        for k, module in enumerate(self.model.mtp, start=1):
            start = min(self.valid[k - 1], last)
            h_prev = self.hidden[k - 1][:, start : last + 1]  # [1, s, hidden]
            next_ids = ext[start + k : last + 1 + k].unsqueeze(0)  # [1, s]: t[j+k] for j in start..last
            h = module(h_prev, self.model.embed_tokens(next_ids), start, self.caches[k - 1])
            if k < self.depths:
                self.hidden[k][:, start : last + 1] = h
            logits = self.model.head(module.norm(h[0, -1]))  # [vocab]: the guess of t[last + k + 1]
            if sample_probs is None:
                token = greedy(logits)
            else:
                q = sample_probs(logits)
                probs.append(q)
                token = sample_from(q, generator)
            drafted.append(int(token))
            ext = torch.cat((ext, token.reshape(1)))
            self.valid[k - 1] = n_tok - k
        return Draft(drafted, torch.stack(probs) if probs else None)


def accept_greedy(target_logits: torch.Tensor, drafts: list[int]) -> tuple[int, int]:
    """target_logits [n+1, vocab] (position i targets draft i+1; row n follows the last draft) ->
    (number of drafts accepted a, the next token: the target's argmax after the accepted prefix).

    Under greedy decoding this emits exactly the tokens plain greedy decoding would."""
    target = greedy(target_logits).tolist()  # [n + 1]
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == target[accepted]:
        accepted += 1
    return accepted, target[accepted]


def accept_sampled(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    drafts: list[int],
    generator: torch.Generator,
) -> tuple[int, int]:
    """Speculative sampling. target_probs p [n+1, vocab], draft_probs q [n, vocab], drafts d [n] drawn
    from q. Draft i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection
    the next token is drawn from the residual norm(max(p_i - q_i, 0)), and if all are accepted from
    p_n. Every emitted token is then distributed exactly as the target p (Leviathan et al. 2023).
    Returns (accepted count, next token)."""
    n = len(drafts)
    if n:
        u = torch.rand(n, generator=generator, device=target_probs.device)
    for i, d in enumerate(drafts):
        p, q = target_probs[i, d], draft_probs[i, d]
        if u[i] * q < p:  # u < p/q without dividing (q > 0: d was drawn from q)
            continue
        residual = (target_probs[i] - draft_probs[i]).clamp_min(0.0)
        if residual.sum() <= 0:  # p == q: rejection had probability 0; keep the draw exact anyway
            residual = target_probs[i]
        return i, int(sample_from(residual / residual.sum(), generator))
    return n, int(sample_from(target_probs[n], generator))
