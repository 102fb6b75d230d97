"""`generate`: batched cached decoding, optionally with MTP speculative decoding.

Batching prompts of different lengths: `Transformer.forward_cached` takes one start position for the
whole batch (one RoPE offset, one cache write range, one causal mask), so rows can only share a
forward while they sit at the same position. Plain decoding advances every row by one token a step,
so rows whose prompts have the same length form a cohort that shares one cache and decodes together
for the whole run; different lengths are different cohorts, run one after another. No padding is
ever written into a cache, so no attention mask is needed and every row's RoPE positions are its
own. Speculative decoding accepts a different number of drafts per row, so there every row is its own
cohort (batch 1). The trade-off: correctness and simple code over throughput for ragged batches;
per-row start positions in MLA would let all rows share one forward.

Finished rows (EOS) inside a cohort keep being computed until the cohort finishes; their extra
tokens are discarded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from moeforge.model.transformer import Transformer
from moeforge.platform.inference.sampling import check_sampling_args, probabilities, sample
from moeforge.platform.inference.speculative import MTPDrafter, accept_greedy, accept_sampled

SPECULATIVE_MODES = ("none", "mtp")


@dataclass
class GenerationStats:
    """Counters of one `generate` call. A "step" is one main-model forward after prefill: one decode
    step of a cohort, or one verify forward of a row under speculative decoding."""

    prompts: int = 0
    tokens_generated: int = 0  # new tokens returned, all rows
    prefill_forwards: int = 0
    steps: int = 0
    step_tokens: int = 0  # tokens emitted by steps (the first token of each row comes from prefill)
    drafted: int = 0  # drafts sent to verification
    accepted: int = 0
    wall_time_s: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def accepted_per_step(self) -> float:
        """Mean accepted drafts per verify step."""
        return self.accepted / self.steps if self.steps else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens a step emits per row: 1 for plain decoding, 1 + accepted drafts speculatively."""
        return self.step_tokens / self.steps if self.steps else 0.0

    def as_dict(self) -> dict[str, float]:
        out = dict(self.__dict__)
        out.update(
            acceptance_rate=self.acceptance_rate,
            accepted_per_step=self.accepted_per_step,
            tokens_per_step=self.tokens_per_step,
        )
        return out


@dataclass
class GenerationResult:
    """tokens[i]: the new tokens for prompts[i] (prompt excluded, EOS included when it ended the row)."""

    tokens: list[list[int]]
    stats: GenerationStats = field(default_factory=GenerationStats)


@dataclass
class _Sampler:
    temperature: float
    top_k: int | None
    top_p: float | None
    generator: torch.Generator

    def token(self, logits: torch.Tensor) -> torch.Tensor:
        return sample(logits, self.generator, self.temperature, self.top_k, self.top_p)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return probabilities(logits, self.temperature, self.top_k, self.top_p)


class _Row:
    """Output bookkeeping of one prompt: budget, EOS, streaming callback."""

    def __init__(self, index: int, budget: int, eos_id: int | None, on_token, stats: GenerationStats):
        self.index, self.budget, self.eos_id = index, budget, eos_id
        self.on_token, self.stats = on_token, stats
        self.out: list[int] = []
        self.done = budget == 0

    @property
    def remaining(self) -> int:
        return self.budget - len(self.out)

    def emit(self, tokens: list[int]) -> None:
        for tok in tokens:
            if self.done:
                return
            self.out.append(tok)
            self.stats.tokens_generated += 1
            if self.on_token is not None:
                self.on_token(self.index, tok)
            self.done = tok == self.eos_id or self.remaining == 0


def validate_request(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_id: int | None,
    speculative: str,
) -> None:
    """Every check `generate` makes before doing any work; ValueError naming the cause."""
    cfg = model.cfg
    if speculative not in SPECULATIVE_MODES:
        raise ValueError(f"speculative must be one of {SPECULATIVE_MODES}, got {speculative!r}")
    if speculative == "mtp" and len(model.mtp) == 0:
        raise ValueError(
            "speculative='mtp' needs MTP modules, but this model has none "
            "(num_nextn_predict_layers = 0, or loaded without MTP weights)"
        )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    check_sampling_args(temperature, top_k, top_p)
    if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {cfg.vocab_size})")
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    context = cfg.max_position_embeddings
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token")
        bad = [
            t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < cfg.vocab_size
        ]
        if bad:
            raise ValueError(
                f"prompt {i} has token ids outside the vocabulary [0, {cfg.vocab_size}): {bad[:5]}"
            )
        if len(prompt) > context:
            raise ValueError(
                f"prompt {i} is longer than the context: {len(prompt)} tokens > "
                f"max_position_embeddings {context}"
            )
        # the last new token is never fed back, so the cache needs len + max_new_tokens - 1 positions
        if len(prompt) + max_new_tokens - 1 > context:
            raise ValueError(
                f"prompt {i} ({len(prompt)} tokens) + max_new_tokens {max_new_tokens} exceeds the "
                f"context: max_position_embeddings {context}"
            )


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_id: int | None = None,
    speculative: str = "none",
    on_token: Callable[[int, int], None] | None = None,
) -> GenerationResult:
    """Continue each prompt by up to `max_new_tokens` tokens (fewer if `eos_id` is produced).

    temperature 0 is greedy; otherwise tokens are drawn from softmax(logits / temperature) after
    top-k and top-p filtering, with a generator seeded by `seed` (the same call gives the same output).
    speculative="mtp" drafts with the model's MTP modules and verifies with one main-model forward
    per step; under greedy it returns exactly what speculative="none" returns, under sampling tokens
    with the same distribution. `on_token(prompt_index, token)` is called for every new token as it
    is emitted. Errors (ValueError) come before any work. The model runs in eval mode and is put
    back in its previous mode afterwards.
    """
    validate_request(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, speculative)
    t0 = time.perf_counter()
    device = model.embed.weight.device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    sampler = _Sampler(temperature, top_k, top_p, generator)
    stats = GenerationStats(prompts=len(prompts))
    rows = [_Row(i, max_new_tokens, eos_id, on_token, stats) for i in range(len(prompts))]
    was_training = model.training
    model.eval()
    try:
        if speculative == "mtp":
            for row in rows:
                _speculative_row(model, list(prompts[row.index]), row, sampler, stats, device)
        else:
            cohorts: dict[int, list[_Row]] = {}
            for row in rows:
                cohorts.setdefault(len(prompts[row.index]), []).append(row)
            for cohort in cohorts.values():
                ids = torch.tensor([prompts[r.index] for r in cohort], device=device)  # [g, length]
                _plain_cohort(model, ids, cohort, sampler, stats)
    finally:
        model.train(was_training)
    stats.wall_time_s = time.perf_counter() - t0
    return GenerationResult(tokens=[r.out for r in rows], stats=stats)


def _plain_cohort(model: Transformer, ids: torch.Tensor, rows: list[_Row], sampler: _Sampler, stats) -> None:
    """Rows with equal prompt length ids [g, length]: prefill once, then one token per step."""
    if all(r.done for r in rows):
        return
    g, length = ids.shape
    cache = model.make_cache(g, length + rows[0].budget)
    logits = model.forward_cached(ids, cache, 0)[:, -1]  # [g, vocab]
    stats.prefill_forwards += 1
    pos = length
    while True:
        tokens = sampler.token(logits)  # [g]
        for row, tok in zip(rows, tokens.tolist()):
            row.emit([tok])
        if all(r.done for r in rows):
            return
        logits = model.forward_cached(tokens[:, None], cache, pos)[:, -1]  # [g, 1] -> [g, vocab]
        stats.steps += 1
        stats.step_tokens += sum(not r.done for r in rows)
        pos += 1


def _speculative_row(
    model: Transformer, prompt: list[int], row: _Row, sampler: _Sampler, stats, device
) -> None:
    """One row with MTP drafting: prefill, then draft D / verify once / accept / roll back, per step.

    Rolling back the main cache is only moving `n_tok`: positions past the accepted prefix hold
    latents of rejected drafts, but the next verify writes from position n_tok - 1 on, so they are
    overwritten before any query can attend them (queries attend cache entries <= their position)."""
    if row.done:
        return
    greedy = sampler.temperature == 0.0
    max_len = len(prompt) + row.budget
    cache = model.make_cache(1, max_len)
    drafter = MTPDrafter(model, max_len)
    ids = torch.tensor(prompt, device=device)  # [N]: the row's tokens so far
    h = model.hidden_cached(ids[None], cache, 0)  # [1, P, hidden]
    stats.prefill_forwards += 1
    drafter.record_main_hidden(0, h)
    first = int(sampler.token(model.logits(h[:, -1])[0]))
    row.emit([first])
    ids = torch.cat((ids, ids.new_tensor([first])))
    while not row.done:
        n_tok = ids.shape[0]  # main model has processed ids[:n_tok - 1]
        draft = drafter.draft(ids, None if greedy else sampler.probs, sampler.generator)
        n = min(len(draft.tokens), row.remaining - 1)  # never verify past the token budget
        drafts = draft.tokens[:n]
        verify = torch.cat((ids[-1:], ids.new_tensor(drafts)))[None]  # [1, 1 + n]
        h = model.hidden_cached(verify, cache, n_tok - 1)  # positions n_tok-1 .. n_tok-1+n
        logits = model.logits(h)[0]  # [1 + n, vocab]
        if greedy:
            accepted, nxt = accept_greedy(logits, drafts)
        else:
            accepted, nxt = accept_sampled(sampler.probs(logits), draft.probs[:n], drafts, sampler.generator)
        new = drafts[:accepted] + [nxt]
        stats.steps += 1
        stats.drafted += n
        stats.accepted += accepted
        before = len(row.out)
        row.emit(new)
        stats.step_tokens += len(row.out) - before
        # keep the hidden states of the accepted inputs t[n_tok-1], d_1..d_accepted
        drafter.record_main_hidden(n_tok - 1, h[:, : accepted + 1])
        ids = torch.cat((ids, ids.new_tensor(new)))
