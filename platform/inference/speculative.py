"""MTP speculative decoding: drafting with the MTP modules, and the acceptance rules.

Alignment (`model.mtp.MTPModule`, `Transformer._head_and_loss`): MTP depth k at position j reads the previous
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

Batched: every row has its own N (and so its own valid lengths and last position), so one drafting
call runs each depth once over the whole batch with per-row start positions (MLA's LongTensor
start_pos): row i's span start_i .. last_i, right-padded to the longest span. The padding entries
land in the depth's cache and hidden buffer at positions past last_i, which is inside the row's
invalid region (>= N-k), so, like rejected drafts, they are rewritten before any query reaches them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moeforge.model.mla import LatentCache
from moeforge.model.transformer import Transformer
from moeforge.platform.inference.sampling import greedy, sample_from


@dataclass
class Draft:
    """Drafted tokens d_1..d_D per row and, when sampling, the draft distributions they came from."""

    tokens: torch.Tensor  # [b, D] long
    probs: torch.Tensor | None  # [b, D, vocab] (None under greedy)


class MTPDrafter:
    """Drafting state for a batch of rows: per MTP depth a LatentCache [batch, max_len] and a valid
    length per row, and the hidden-state buffers h_0 .. h_{D-1} that the next depth reads.

    `hidden[0]` is filled by the caller from the main model (`record_main_hidden`); the rest is
    written here. Buffers are [batch, max_len, hidden]: simple and exact, at the cost of D * hidden
    floats per position on top of the latent cache (fine for a reference decoder). Right-padding
    writes a few positions past a row's last one, so `max_len` needs about 2 * D positions of slack
    beyond the longest row (the MLA raises if a write would fall outside)."""

    def __init__(self, model: Transformer, max_len: int, batch: int = 1) -> None:
        cfg, ref = model.cfg, model.embed.weight
        self.model = model
        self.batch = batch
        self.depths = len(model.mtp)
        self.caches = [
            LatentCache.empty(cfg, batch, max_len, ref.device, ref.dtype) for _ in range(self.depths)
        ]
        self.hidden = [
            torch.zeros(batch, max_len, cfg.hidden_size, device=ref.device, dtype=ref.dtype)
            for _ in range(self.depths)
        ]
        # depth k+1's cache entries of row i below valid[k][i] are true
        self.valid = [torch.zeros(batch, dtype=torch.long, device=ref.device) for _ in range(self.depths)]
        self._rows = torch.arange(batch, device=ref.device)

    def record_main_hidden(
        self, start: int | torch.Tensor, h: torch.Tensor, counts: torch.Tensor | None = None
    ) -> None:
        """Main-model hidden states h [batch, s, hidden]: row i's first counts[i] (default all s)
        entries are its positions start[i] .. start[i]+counts[i]-1 (`start` an int or a LongTensor
        [batch]); the rest of the row (padding, rejected drafts) is not recorded."""
        b, s = h.shape[:2]
        start = torch.as_tensor(start, dtype=torch.long, device=h.device).expand(b)  # [b]
        offsets = torch.arange(s, device=h.device)  # [s]
        keep = offsets[None] < (s if counts is None else counts.to(h.device)[:, None])  # [b, s]
        positions = start[:, None] + offsets[None]  # [b, s]
        rows = self._rows[:b, None].expand(b, s)  # [b, s]
        self.hidden[0][rows[keep], positions[keep]] = h[keep]  # h[keep]: [kept, hidden]

    @torch.no_grad()
    def draft(
        self, tokens: torch.Tensor, lengths: torch.Tensor | None = None, sample_probs=None, generator=None
    ) -> Draft:
        """Draft D tokens after each row: tokens [batch, L] holds row i's tokens (prompt + generated)
        in its first lengths[i] (default L) columns, and the main model has processed all of them
        but the last. `sample_probs` maps logits [batch, vocab] -> probabilities (temperature > 0);
        None drafts greedily."""
        b, width = tokens.shape
        device = tokens.device
        n_tok = torch.full((b,), width, device=device) if lengths is None else lengths.to(device)  # [b]
        if bool((n_tok < 2).any()):
            raise ValueError("MTPDrafter.draft: every row needs >= 2 tokens (one processed, one new)")
        last = n_tok - 2  # [b]: each row's last position with a main-model hidden state
        rows = self._rows[:b]
        # the row extended by its drafts: d_k goes to column N+k-1; columns past a row's end are scratch
        ext = torch.cat((tokens, tokens.new_zeros(b, self.depths)), dim=1)  # [b, L + D]
        drafted: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []
        for k, module in enumerate(self.model.mtp, start=1):
            start = torch.minimum(self.valid[k - 1], last)  # [b]
            span = last - start + 1  # [b]: positions start..last of each row are (re)computed
            s = int(span.max())
            offsets = torch.arange(s, device=device)  # [s]
            positions = start[:, None] + offsets[None]  # [b, s]; past a row's span: padding
            real = offsets[None] < span[:, None]  # [b, s]
            hidden_in = self.hidden[k - 1]
            h_prev = hidden_in[rows[:, None], positions.clamp(max=hidden_in.shape[1] - 1)]  # [b, s, hidden]
            next_ids = ext.gather(1, (positions + k).clamp(max=ext.shape[1] - 1))  # [b, s]: t[j+k]
            h = module(h_prev, self.model.embed_tokens(next_ids), start, self.caches[k - 1])  # [b, s, hidden]
            if k < self.depths:
                self.hidden[k][rows[:, None].expand(b, s)[real], positions[real]] = h[real]
            h_last = h[rows, span - 1]  # [b, hidden]: each row's position `last`
            logits = self.model.head(module.norm(h_last))  # [b, vocab]: the guess of t[last + k + 1]
            if sample_probs is None:
                token = greedy(logits)  # [b]
            else:
                q = sample_probs(logits)  # [b, vocab]
                probs.append(q)
                token = sample_from(q, generator)  # [b]
            drafted.append(token)
            ext[rows, n_tok + k - 1] = token
            self.valid[k - 1] = n_tok - k
        return Draft(torch.stack(drafted, dim=1), torch.stack(probs, dim=1) if probs else None)


def accept_greedy_batch(
    target_logits: torch.Tensor, drafts: torch.Tensor, n_valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """target_logits [b, n+1, vocab] (position i targets draft i+1), drafts [b, n], n_valid [b]: row
    i verifies only its first n_valid[i] drafts -> (accepted count [b], next token [b]: the target's
    argmax after the accepted prefix). Under greedy this emits exactly what plain decoding would."""
    target = greedy(target_logits)  # [b, n + 1]
    n = drafts.shape[1]
    match = (drafts == target[:, :n]) & (torch.arange(n, device=drafts.device)[None] < n_valid[:, None])
    accepted = match.long().cumprod(dim=1).sum(dim=1)  # [b]: the length of the matching prefix
    return accepted, target.gather(1, accepted[:, None]).squeeze(1)


def accept_sampled_batch(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    drafts: torch.Tensor,
    n_valid: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling, per row. target_probs p [b, n+1, vocab], draft_probs q [b, n, vocab],
    drafts d [b, n] drawn from q; row i verifies its first n_valid[i] drafts. Draft j is accepted with
    probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection j the next token is drawn from the
    residual norm(max(p_j - q_j, 0)), and if all n_valid[i] are accepted from p_{n_valid[i]}. Every
    emitted token is then distributed exactly as the target p (Leviathan et al. 2023).
    Returns (accepted count [b], next token [b])."""
    b, n = drafts.shape
    device = target_probs.device
    rows = torch.arange(b, device=device)
    if n:
        u = torch.rand(b, n, generator=generator, device=device)
        p_d = target_probs[:, :n].gather(2, drafts[..., None]).squeeze(2)  # [b, n]
        q_d = draft_probs.gather(2, drafts[..., None]).squeeze(2)  # [b, n]
        # u < p/q without dividing (q > 0: d was drawn from q)
        ok = (u * q_d < p_d) & (torch.arange(n, device=device)[None] < n_valid[:, None])
        accepted = ok.long().cumprod(dim=1).sum(dim=1)  # [b]
    else:
        accepted = torch.zeros(b, dtype=torch.long, device=device)
    dist = target_probs[rows, accepted]  # [b, vocab]: p after the accepted prefix
    rejected = accepted < n_valid  # [b]
    if bool(rejected.any()):
        at = accepted.clamp(max=max(n - 1, 0))
        residual = (target_probs[rows, at] - draft_probs[rows, at]).clamp_min(0.0)  # [b, vocab]
        mass = residual.sum(dim=-1, keepdim=True)  # [b, 1]
        # p == q: rejection had probability 0; keep the draw exact anyway
        residual = torch.where(mass > 0, residual / mass.clamp_min(torch.finfo(mass.dtype).tiny), dist)
        dist = torch.where(rejected[:, None], residual, dist)
    return accepted, sample_from(dist, generator)


def accept_greedy(target_logits: torch.Tensor, drafts: list[int]) -> tuple[int, int]:
    """One row of `accept_greedy_batch`: target_logits [n+1, vocab], drafts [n] -> (accepted, next)."""
    d = torch.tensor(drafts, dtype=torch.long, device=target_logits.device)[None]  # [1, n]
    accepted, nxt = accept_greedy_batch(target_logits[None], d, d.new_tensor([len(drafts)]))
    return int(accepted), int(nxt)


def accept_sampled(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    drafts: list[int],
    generator: torch.Generator,
) -> tuple[int, int]:
    """One row of `accept_sampled_batch`: p [n+1, vocab], q [n, vocab], drafts [n] -> (accepted, next)."""
    d = torch.tensor(drafts, dtype=torch.long, device=target_probs.device)[None]  # [1, n]
    accepted, nxt = accept_sampled_batch(
        target_probs[None], draft_probs[None], d, d.new_tensor([len(drafts)]), generator
    )
    return int(accepted), int(nxt)
