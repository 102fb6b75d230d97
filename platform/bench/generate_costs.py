"""The per-step costs behind a speculative decoding speedup (`moeforge-bench generate`).

At batch B, mid-generation (the cache filled to prompt_len + max_new_tokens // 2 positions), each
of these is timed on its own, median of `repeats` calls after two warm-up calls, in ms:

    t_decode   plain decoding's step: the main model's cached forward of 1 token per row, then argmax
    t_verify   speculative decoding's verify: the main model's cached forward of 1 + D tokens per row
               (the newest token and D drafts), then argmax at every position
    t_draft    the drafts: D MTP module forwards of 1 position per row, each on its own latent cache,
               then the shared head and argmax (depth k reads depth k-1's hidden state and the
               embedding of depth k-1's draft, as `platform.inference.speculative.MTPDrafter` drafts)

The start positions take the form `generate` gives them: plain decoding of equal-length prompts
passes one int; a speculative batch passes per-row LongTensor starts (its rows sit at different
positions once they accept different numbers of drafts), the verify of a single row an int, and
the drafter always the LongTensor. The drafter recomputes each depth over the positions accepted
since its last call (padded to the batch's longest span, up to 1 + D), so t_draft at one position
is its lower bound, and the expected speedup below an upper bound.

Each ends with the tokens read back to Python (`tolist`), as the decoding loops do, so GPU timings
include the synchronisation. With a per-row mean of T tokens per verify step (1 + accepted drafts),
speculative decoding can at best be T * t_decode / (t_verify + t_draft) times as fast as plain
decoding: the bench puts that next to the measured ratio. What the formula leaves out (prefill,
acceptance bookkeeping, rows verified one at a time) is what separates the two.

The token values do not matter for the timings (MoE routing aside), so the context is the prompts
repeated; the forwards are the model's own (`Transformer.forward_cached` / `hidden_cached`,
`MTPModule.forward`), not copies of them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from moeforge.model.mla import LatentCache
from moeforge.model.transformer import Transformer
from moeforge.platform.inference.sampling import greedy


def sync(model: Transformer) -> None:
    """Wait for the model's device (a no-op on CPU), so wall time covers the queued work."""
    if model.embed.weight.is_cuda:
        torch.cuda.synchronize()


def _median_ms(model: Transformer, fn: Callable[[], object], repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        sync(model)
        start = time.perf_counter()
        fn()
        sync(model)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


@torch.no_grad()
def step_costs(model: Transformer, prompts: list[list[int]], max_new_tokens: int, repeats: int) -> dict:
    """{t_decode_ms, t_verify_ms, t_draft_ms, batch, position, verify_tokens} at batch len(prompts)."""
    was_training = model.training
    model.eval()
    try:
        return _step_costs(model, prompts, max_new_tokens, repeats)
    finally:
        model.train(was_training)


def _step_costs(model: Transformer, prompts: list[list[int]], max_new_tokens: int, repeats: int) -> dict:
    cfg, ref = model.cfg, model.embed.weight
    depths = len(model.mtp)
    batch, prompt_len = len(prompts), len(prompts[0])
    pos = prompt_len + max_new_tokens // 2  # the step measured: half-way through generation
    max_len = pos + 1 + depths
    base = torch.tensor(prompts, device=ref.device)  # [B, prompt_len]
    ids = base.repeat(1, -(-pos // prompt_len))[:, :pos]  # [B, pos]: the context already decoded

    cache = model.make_cache(batch, max_len)
    h = model.hidden_cached(ids, cache, 0)  # [B, pos, hidden]
    mtp_caches = [LatentCache.empty(cfg, batch, max_len, ref.device, ref.dtype) for _ in range(depths)]
    h_prev = h
    for k, module in enumerate(model.mtp, start=1):  # fill each depth's cache over the context
        next_ids = torch.roll(ids, -k, dims=1)  # [B, pos]: t[j+k] (wrapped; values do not matter)
        h_prev = module(h_prev, model.embed_tokens(next_ids), 0, mtp_caches[k - 1])

    per_row = torch.full((batch,), pos, dtype=torch.long, device=ref.device)  # [B]
    verify_start = pos if batch == 1 else per_row  # generate's _start(): an int only if all rows agree
    draft_start = per_row - 1  # the drafter's starts: the last position with a main hidden state
    newest = ids[:, -1:]  # [B, 1]
    verify_ids = ids[:, -(1 + depths) :]  # [B, 1 + D]: the newest token and D drafts
    last_hidden = h[:, -1:]  # [B, 1, hidden]: the main model's hidden state at pos - 1

    def decode() -> list:
        return greedy(model.forward_cached(newest, cache, pos)[:, -1]).tolist()

    def verify() -> list:
        return greedy(model.logits(model.hidden_cached(verify_ids, cache, verify_start))).tolist()

    def draft() -> list:
        x, token, out = last_hidden, newest, []
        for k, module in enumerate(model.mtp, start=1):
            x = module(x, model.embed_tokens(token), draft_start, mtp_caches[k - 1])  # [B, 1, hidden]
            token = greedy(model.head(module.norm(x)))  # [B, 1]
            out.append(token.tolist())  # the drafter reads every draft back before the next depth
        return out

    return {
        "batch": batch,
        "position": pos,
        "verify_tokens": 1 + depths,
        "repeats": repeats,
        "t_decode_ms": _median_ms(model, decode, repeats),
        "t_verify_ms": _median_ms(model, verify, repeats),
        "t_draft_ms": _median_ms(model, draft, repeats),
    }
