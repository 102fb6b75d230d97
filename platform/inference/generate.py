"""`generate`: batched cached decoding, optionally with MTP speculative decoding.

All prompts share one batch for the whole call, whatever their lengths: the cached forward takes a
LongTensor of per-row start positions (MLA: each row's own RoPE positions, cache write positions and
causal mask), so rows at different positions still share one forward.

* Prefill: the prompts are right-padded to the longest and run in one forward from position 0; each
  row's first token comes from the logits at its own last prompt position.
* Plain decoding: one batched forward per step, row i's new token at its own position len_i + step.
* Speculative decoding (speculative="mtp"): all rows draft together (MTPDrafter, batched), one
  verify forward checks every row's drafts, each row accepts its own number of them, and its cache
  position advances by its own accepted count + 1.

Padding and rejected drafts leave latents in a row's cache past its length. They are never
attended: a row's next write always starts at its own next position, and every later position is
written (in that forward, before attention reads the cache) before any query reaches it, while a
query at position p attends only that row's entries <= p. So no attention mask beyond the causal one
is needed.

Rows that finished (EOS or budget) stay in the batch until every row is done: they keep being
computed (a finished speculative row stays at its position and verifies no drafts), and what they
produce is discarded. Their compute is the price of one fixed batch; dropping them would mean
compacting every cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from moeforge.model.transformer import Transformer
from moeforge.platform.inference.sampling import check_sampling_args, probabilities, sample
from moeforge.platform.inference.speculative import MTPDrafter, accept_greedy_batch, accept_sampled_batch

SPECULATIVE_MODES = ("none", "mtp")


@dataclass
class GenerationStats:
    """Counters of one `generate` call.

    A "step" is one batched main-model forward after prefill: one decode step of the whole batch, or
    one verify forward of the whole batch under speculative decoding. A "row-step" is one row taking
    part in a step while still unfinished; `row_steps` sums them, and the per-step means below are
    per row per step (divided by row-steps), so they do not depend on how many rows were batched.
    `step_tokens`, `drafted` and `accepted` sum over rows."""

    prompts: int = 0
    tokens_generated: int = 0  # new tokens returned, all rows
    prefill_forwards: int = 0
    steps: int = 0  # batched decode / verify forwards
    row_steps: int = 0  # (unfinished row, step) pairs
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
        """Mean accepted drafts per row per verify step (accepted / row_steps)."""
        return self.accepted / self.row_steps if self.row_steps else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens a step emits per row (step_tokens / row_steps): 1 for plain decoding, 1 +
        accepted drafts speculatively (less where EOS or the budget cut a row's step short)."""
        return self.step_tokens / self.row_steps if self.row_steps else 0.0

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
    cache_bytes_per_token: int = 0  # the main model's latent cache, all layers, one row's position


def cache_bytes_per_token(model: Transformer) -> int:
    """Bytes the main model's latent cache holds per token of one row, summed over layers:
    num_hidden_layers x (kv_lora_rank + qk_rope_head_dim) x the cache dtype's size, measured on the
    tensors `make_cache` allocates (BF16 weights: moeforge-estimate's "KV cache / token")."""
    cache = model.make_cache(1, 1)  # [1, 1, ...] per layer
    return sum(t.numel() * t.element_size() for layer in cache for t in (layer.latent, layer.k_rope))


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
    is emitted. All prompts, whatever their lengths, run as one batch (see the module docstring);
    each row's tokens are those it would get alone under greedy decoding. Errors (ValueError) come
    before any work. The model runs in eval mode and is put back in its previous mode afterwards.
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
        if max_new_tokens > 0:
            run = _speculative if speculative == "mtp" else _plain
            run(model, [list(p) for p in prompts], rows, sampler, stats, device)
    finally:
        model.train(was_training)
    stats.wall_time_s = time.perf_counter() - t0
    return GenerationResult(
        tokens=[r.out for r in rows], stats=stats, cache_bytes_per_token=cache_bytes_per_token(model)
    )


def _start(positions: torch.Tensor) -> int | torch.Tensor:
    """Per-row start positions [b] as the cached forward takes them: a plain int when every row is at
    the same position (MLA's single-offset fast path), else the LongTensor."""
    first = int(positions[0])
    return first if bool((positions == first).all()) else positions


def _prefill(model: Transformer, prompts: list[list[int]], cache_len: int, stats, device):
    """One forward over the right-padded prompts from position 0.

    Returns (cache, ids [b, cache_len] with row i's prompt in its first len_i columns and zeros after,
    lengths [b], h [b, longest, hidden], the last block output). The padding columns are run too, so
    their latents land in the cache at positions len_i .. longest-1 of the shorter rows. That is
    harmless: a real query at position p < len_i attends entries <= p (the causal mask), and the
    row's next token is written at len_i, its next at len_i + 1 and so on, each in the forward whose
    query sits there and before that forward's attention reads the cache, so every padding entry is
    overwritten before any query can reach it."""
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # [b]
    longest = int(lengths.max())
    ids = torch.zeros(len(prompts), cache_len, dtype=torch.long, device=device)  # [b, cache_len]
    for i, prompt in enumerate(prompts):
        ids[i, : len(prompt)] = torch.tensor(prompt, device=device)
    cache = model.make_cache(len(prompts), cache_len)
    h = model.hidden_cached(ids[:, :longest], cache, 0)  # [b, longest, hidden]
    stats.prefill_forwards += 1
    return cache, ids, lengths, h


def _live(rows: list[_Row], device) -> torch.Tensor:
    return torch.tensor([not r.done for r in rows], device=device)  # [b] bool


def _plain(model: Transformer, prompts, rows: list[_Row], sampler: _Sampler, stats, device) -> None:
    """Prefill once, then one token per row per batched forward, each row at its own position."""
    budget = rows[0].budget
    b = len(rows)
    cache_len = max(len(p) for p in prompts) + budget  # the last row writes at most len + budget - 2
    cache, _, lengths, h = _prefill(model, prompts, cache_len, stats, device)
    batch = torch.arange(b, device=device)
    logits = model.logits(h[batch, lengths - 1])  # [b, vocab]: each row's last prompt position
    pos = lengths  # [b]: where each row's next input token goes
    while True:
        tokens = sampler.token(logits)  # [b]
        for row, tok in zip(rows, tokens.tolist()):
            row.emit([tok])
        live = sum(not r.done for r in rows)
        if not live:
            return
        logits = model.forward_cached(tokens[:, None], cache, _start(pos))[:, -1]  # [b, 1] -> [b, vocab]
        stats.steps += 1
        stats.row_steps += live
        stats.step_tokens += live  # every unfinished row takes exactly this step's token
        pos = pos + 1  # finished rows advance too: they are computed and discarded


def _speculative(model: Transformer, prompts, rows: list[_Row], sampler: _Sampler, stats, device) -> None:
    """All rows together: prefill, then per step draft D per row / verify the batch once / accept per
    row / move each row's position by its own count.

    Rolling a row back is only not advancing its `n_tok`: positions past its accepted prefix hold
    latents of rejected drafts (or of padding, where its verify span was shorter than the batch's),
    but its next verify writes from its position n_tok - 1 on, so they are overwritten before any
    query can attend them (queries attend cache entries <= their position)."""
    greedy = sampler.temperature == 0.0
    budget, depths, b = rows[0].budget, len(model.mtp), len(rows)
    # Padding writes run past a row's last real position: by up to D in a verify span and up to 2D
    # in a drafting span (MTPDrafter), hence the slack.
    cache_len = max(len(p) for p in prompts) + budget + 2 * depths
    cache, ids, lengths, h = _prefill(model, prompts, cache_len, stats, device)
    drafter = MTPDrafter(model, cache_len, batch=b)
    drafter.record_main_hidden(0, h, counts=lengths)
    batch = torch.arange(b, device=device)
    first = sampler.token(model.logits(h[batch, lengths - 1]))  # [b]
    for row, tok in zip(rows, first.tolist()):
        row.emit([tok])
    ids[batch, lengths] = first
    n_tok = lengths + 1  # [b]: row i holds ids[i, :n_tok[i]]; the main model has processed all but the last
    while not all(r.done for r in rows):
        live = _live(rows, device)  # [b]
        draft = drafter.draft(ids, n_tok, None if greedy else sampler.probs, sampler.generator)
        # drafts row i verifies: never past its token budget; none once it is finished
        remaining = torch.tensor([r.remaining for r in rows], device=device)  # [b]
        n_valid = torch.where(live, (remaining - 1).clamp(min=0, max=depths), 0)  # [b]
        n = int(n_valid.max())
        drafts = draft.tokens[:, :n]  # [b, n]
        verify = torch.cat((ids[batch, n_tok - 1][:, None], drafts), dim=1)  # [b, 1 + n]
        h = model.hidden_cached(verify, cache, _start(n_tok - 1))  # row i: positions n_tok[i]-1 ..
        logits = model.logits(h)  # [b, 1 + n, vocab]
        if greedy:
            accepted, nxt = accept_greedy_batch(logits, drafts, n_valid)
        else:
            accepted, nxt = accept_sampled_batch(
                sampler.probs(logits), draft.probs[:, :n], drafts, n_valid, sampler.generator
            )
        accepted = torch.where(live, accepted, 0)  # [b]
        # row i's new tokens d_1..d_a, next at columns 0..a (columns past a: scratch)
        new = torch.cat((drafts, drafts.new_zeros(b, 1)), dim=1).scatter(1, accepted[:, None], nxt[:, None])
        stats.steps += 1
        stats.row_steps += int(live.sum())
        stats.drafted += int(n_valid.sum())
        stats.accepted += int(accepted.sum())
        for row, toks, a in zip(rows, new.tolist(), accepted.tolist()):
            if not row.done:
                before = len(row.out)
                row.emit(toks[: a + 1])
                stats.step_tokens += len(row.out) - before
        # keep the hidden states of the accepted inputs t[n_tok-1], d_1..d_a (none for finished rows)
        advance = torch.where(live, accepted + 1, 0)  # [b]
        drafter.record_main_hidden(n_tok - 1, h, counts=advance)
        # columns past a row's new length are scratch, so writing all 1 + n of them is harmless
        cols = n_tok[:, None] + torch.arange(n + 1, device=device)[None]  # [b, 1 + n]
        ids.scatter_(1, cols.clamp(max=ids.shape[1] - 1), new)
        n_tok = n_tok + advance
