"""platform/inference: cached decoding against the uncached forward, per-row start positions against
each row run alone, ragged batches against batch 1, MTP speculative decoding against plain decoding,
the drafting alignment against the MTP training path, sampling and input errors."""

from __future__ import annotations

import copy

import pytest
import torch
from moeforge.model.config import ModelConfig
from moeforge.model.mla import MLA, LatentCache
from moeforge.model.transformer import build_model
from moeforge.platform.inference import generate as gen
from moeforge.platform.inference.generate import generate
from moeforge.platform.inference.sampling import filter_top_p, probabilities, sample
from moeforge.platform.inference.speculative import (
    MTPDrafter,
    accept_greedy_batch,
    accept_sampled,
    accept_sampled_batch,
)
from moeforge.platform.plan.accounting import estimate

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT_LENGTHS = (3, 7, 7, 12)  # ragged, with one repeated length
RAGGED_8 = (1, 3, 4, 7, 7, 9, 12, 15)  # a batch of 8: every row at its own position but one pair


def small_cfg(**over) -> ModelConfig:
    base = {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "moe_intermediate_size": 16,
        "num_hidden_layers": 2,
        "num_nextn_predict_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "q_lora_rank": 16,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "max_position_embeddings": 64,
        "rope_scaling": None,
        "seq_len": 32,
        "initializer_range": 0.3,  # large enough that argmax gaps dwarf rounding differences
    }
    base.update(over)
    return ModelConfig(**base)


def random_model(depths: int = 1, seed: int = 0):
    # float64: greedy equality across differently shaped forwards must not hinge on near-ties
    return build_model(small_cfg(num_nextn_predict_layers=depths), seed=seed).double().eval()


def prompts_for(vocab: int, seed: int = 1, lengths=PROMPT_LENGTHS) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """Re-run the full uncached (training-path) forward over the whole sequence every step."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


PERIOD = 11


@pytest.fixture(scope="module")
def trained():
    """A model (2 MTP depths) fitted to one repeating 11-token pattern in a plain AdamW loop, so that
    the main head and both MTP heads predict it: a model whose drafts are worth accepting."""
    torch.manual_seed(0)
    model = build_model(small_cfg(num_nextn_predict_layers=2, initializer_range=0.05), seed=0)
    g = torch.Generator().manual_seed(1)
    pattern = torch.randint(0, 64, (PERIOD,), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        offsets = torch.randint(0, PERIOD, (8,), generator=g)
        x = pattern[(offsets[:, None] + torch.arange(33)[None]) % PERIOD]  # [8, 33]
        model(x[:, :-1], x[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), pattern.tolist()


def trained_prompts(pattern: list[int]) -> list[list[int]]:
    cycle = pattern * 3
    return [cycle[:3], cycle[2:9], cycle[5:12], cycle[4:16]]


def trained_prompts_8(pattern: list[int]) -> list[list[int]]:
    cycle = pattern * 4
    return [cycle[o : o + n] for o, n in zip((0, 5, 2, 9, 3, 7, 1, 10), RAGGED_8)]


def noisy_copy(model, scale: float = 0.4):
    """The model with noise on its MTP projections: its drafts are right only some of the time."""
    noisy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in noisy.mtp:
            module.eh_proj.weight.add_(torch.randn(module.eh_proj.weight.shape, generator=g) * scale)
    return noisy


def count_per_row_calls(monkeypatch) -> list[int]:
    """Record every MLA call that takes the per-row-start path (the batch size of each)."""
    calls: list[int] = []
    original = MLA._cached_per_row

    def spy(self, q, kv, start_pos, cache):
        calls.append(start_pos.shape[0])
        return original(self, q, kv, start_pos, cache)

    monkeypatch.setattr(MLA, "_cached_per_row", spy)
    return calls


# --- cached decoding ----------------------------------------------------------------------------------
def test_cached_greedy_matches_uncached_reference():
    model = random_model()
    prompts = prompts_for(model.cfg.vocab_size)
    out = generate(model, prompts, 10)
    assert out.tokens == [greedy_reference(model, p, 10) for p in prompts]
    stats = out.stats
    assert stats.tokens_generated == 40 and stats.prefill_forwards == 1  # one ragged prefill
    assert stats.steps == 9 and stats.row_steps == 4 * 9  # one batched forward per step, all rows
    assert stats.step_tokens == 36 and stats.tokens_per_step == 1.0


@pytest.mark.parametrize("part", ["main", "mtp"])
def test_per_row_start_positions_equal_each_row_alone(part):
    """fp32. Rows at different positions share one cached forward: a right-padded ragged prefill,
    then a 3-token chunk and a 1-token step at per-row starts (the shorter rows' caches still hold
    padding latents inside the attended range). Each row gets the outputs and the cache entries it
    gets alone at batch 1 with an int start, and the outputs of the uncached training path over
    its whole sequence. Same for an MTP module's cached block (drafting)."""
    model = build_model(small_cfg(), seed=2).eval()  # fp32
    cfg, hidden = model.cfg, model.cfg.hidden_size
    lengths = [2, 9, 5]
    chunks = (3, 1)
    total = [n + sum(chunks) for n in lengths]
    g = torch.Generator().manual_seed(3)
    if part == "main":
        seqs = [torch.randint(0, cfg.vocab_size, (t,), generator=g) for t in total]

        def make_cache(b, length):
            return model.make_cache(b, length)

        def run(x, cache, start):
            return model.forward_cached(x, cache, start)

        def uncached(x):
            return model(x).logits

    else:
        module = model.mtp[0]
        seqs = [torch.randn(t, 2 * hidden, generator=g) for t in total]  # [h_prev; next_emb] per position

        def make_cache(b, length):
            return [LatentCache.empty(cfg, b, length)]

        def run(x, cache, start):
            return module(x[..., :hidden], x[..., hidden:], start, cache[0])

        def uncached(x):
            return module(x[..., :hidden], x[..., hidden:])

    b, longest = len(seqs), max(lengths)
    padded = torch.zeros((b, longest, *seqs[0].shape[1:]), dtype=seqs[0].dtype)  # [b, longest, ...]
    for i, n in enumerate(lengths):
        padded[i, :n] = seqs[i][:n]
    cache = make_cache(b, max(total))
    with torch.no_grad():
        outs = [run(padded, cache, 0)]  # int 0: every row starts at 0
        pos = torch.tensor(lengths)
        for c in chunks:
            outs.append(run(torch.stack([q[p : p + c] for q, p in zip(seqs, pos.tolist())]), cache, pos))
            pos = pos + c
        for i, n in enumerate(lengths):
            own = make_cache(1, total[i])
            alone = [run(seqs[i][None, :n], own, 0)[0]]
            start = n
            for c in chunks:
                alone.append(run(seqs[i][None, start : start + c], own, start)[0])
                start += c
            batched = torch.cat([outs[0][i, :n], *(o[i] for o in outs[1:])])  # row i's real positions
            alone = torch.cat(alone)
            assert torch.allclose(batched, alone, atol=1e-5), (batched - alone).abs().max()
            full = uncached(seqs[i][None])[0]
            assert torch.allclose(batched, full, atol=1e-4), (batched - full).abs().max()
            for layer, mine in zip(cache, own):
                assert torch.allclose(layer.latent[i, : total[i]], mine.latent[0], atol=1e-5)
                assert torch.allclose(layer.k_rope[i, : total[i]], mine.k_rope[0], atol=1e-5)


def test_per_row_start_positions_are_checked():
    model = build_model(small_cfg(), seed=2).eval()
    cache = model.make_cache(2, 8)
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="outside the cache length 8"):
        model.forward_cached(ids, cache, torch.tensor([0, 6]))  # row 1 would write positions 6..8
    with pytest.raises(ValueError, match="LongTensor"):
        model.forward_cached(ids, cache, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="need a LatentCache"):
        model.layers[0].self_attn(torch.zeros(2, 3, model.cfg.hidden_size), torch.tensor([0, 1]))


@pytest.mark.parametrize("speculative", ["none", "mtp"])
def test_ragged_batch_greedy_equals_each_prompt_alone(speculative, monkeypatch):
    """A ragged batch of 8 gives every prompt exactly the tokens it gets alone at batch 1, with and
    without an EOS that stops rows at different steps (finished rows stay in the batch)."""
    model = random_model(depths=2, seed=11)
    prompts = prompts_for(model.cfg.vocab_size, seed=12, lengths=RAGGED_8)
    alone = [generate(model, [p], 12, speculative=speculative).tokens[0] for p in prompts]
    calls = count_per_row_calls(monkeypatch)
    batched = generate(model, prompts, 12, speculative=speculative)
    assert batched.tokens == alone
    assert batched.stats.prefill_forwards == 1 and 8 in calls  # the rows did share forwards
    eos = alone[3][4]
    cut = [row[: row.index(eos) + 1] if eos in row else row for row in alone]
    assert any(len(c) < 12 for c in cut) and any(len(c) == 12 for c in cut)
    stopped = generate(model, prompts, 12, speculative=speculative, eos_id=eos)
    assert stopped.tokens == cut
    stats = stopped.stats
    assert stats.step_tokens == stats.tokens_generated - 8  # the first token of each row: prefill
    if speculative == "none":  # rows that stopped are computed on but not counted
        assert stats.row_steps == stats.step_tokens < 8 * stats.steps


def test_eos_stops_a_row_and_on_token_streams():
    model = random_model()
    prompts = prompts_for(model.cfg.vocab_size)
    full = generate(model, prompts, 8).tokens
    eos = full[1][3]
    seen: list[tuple[int, int]] = []
    out = generate(model, prompts, 8, eos_id=eos, on_token=lambda i, t: seen.append((i, t)))
    for row, new in zip(full, out.tokens):
        cut = row.index(eos) + 1 if eos in row else len(row)
        assert new == row[:cut]
    assert sorted(seen) == sorted((i, t) for i, toks in enumerate(out.tokens) for t in toks)


def test_cache_bytes_per_token():
    cfg = small_cfg()
    model = build_model(cfg, seed=0).to(torch.bfloat16)
    cache = model.make_cache(batch=1, max_len=10)
    per_token = sum(t.numel() * t.element_size() for c in cache for t in (c.latent, c.k_rope)) / 10
    assert per_token == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
    assert per_token == estimate(cfg).kv_cache_bytes_per_token  # the estimator's BF16 figure
    result = generate(model, [[1, 2, 3]], 2)  # what generate reports (and moeforge-generate prints)
    assert result.cache_bytes_per_token == per_token


# --- MTP speculative decoding ------------------------------------------------------------------------------
@pytest.mark.parametrize("depths", [1, 2])
def test_speculative_greedy_equals_plain_random_model(depths):
    model = random_model(depths, seed=3)
    prompts = prompts_for(model.cfg.vocab_size, seed=4)
    plain = generate(model, prompts, 12)
    spec = generate(model, prompts, 12, speculative="mtp")
    assert spec.tokens == plain.tokens
    assert spec.stats.tokens_generated == plain.stats.tokens_generated == 48
    assert 0 <= spec.stats.accepted <= spec.stats.drafted


def test_speculative_greedy_equals_plain_trained_model(trained):
    model, pattern = trained
    prompts = trained_prompts(pattern)
    plain = generate(model, prompts, 24)
    spec = generate(model, prompts, 24, speculative="mtp")
    assert spec.tokens == plain.tokens
    stats = spec.stats
    print(f"trained model, 2 MTP depths: {stats.as_dict()}")
    assert stats.acceptance_rate > 0.5  # both depths draft the pattern (measured: 1.0)
    assert stats.steps < plain.stats.steps  # fewer main-model forwards per row than plain decoding


def test_speculative_greedy_equals_plain_with_partial_acceptance(trained):
    """Noise on the trained MTP projections makes some drafts wrong: rows accept 0, 1 or 2 drafts per
    step, so main-cache rollback and MTP-cache invalidation both run, and the output must not move."""
    model, pattern = trained
    noisy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in noisy.mtp:
            module.eh_proj.weight.add_(torch.randn(module.eh_proj.weight.shape, generator=g) * 0.4)
    prompts = trained_prompts(pattern)
    spec = generate(noisy, prompts, 24, speculative="mtp")
    assert spec.tokens == generate(noisy, prompts, 24).tokens
    print(f"noisy MTP: acceptance {spec.stats.acceptance_rate:.3f}")
    assert 0.2 < spec.stats.acceptance_rate < 0.95  # measured: 0.716


@pytest.mark.parametrize("which", ["random-1", "random-2", "trained", "trained-noisy"])
def test_speculative_greedy_equals_plain_ragged_batch_of_8(which, trained):
    """Batched drafting, one verify forward per step and per-row acceptance give plain greedy's
    tokens on a ragged batch of 8: random models (drafts mostly rejected), the fitted model (all
    accepted) and the fitted model with noisy MTP (rows accept 0..2 drafts in the same step)."""
    if which.startswith("random"):
        model = random_model(depths=int(which[-1]), seed=13)
        prompts = prompts_for(model.cfg.vocab_size, seed=14, lengths=RAGGED_8)
    else:
        model, pattern = trained
        model = noisy_copy(model) if which == "trained-noisy" else model
        prompts = trained_prompts_8(pattern)
    plain = generate(model, prompts, 20)
    spec = generate(model, prompts, 20, speculative="mtp")
    assert spec.tokens == plain.tokens
    stats = spec.stats
    assert stats.tokens_generated == 8 * 20 and stats.step_tokens == 8 * 19
    # no EOS and never a draft past the budget: each unfinished row-step emits accepted + 1 tokens
    assert stats.step_tokens == stats.accepted + stats.row_steps and stats.accepted <= stats.drafted
    assert stats.accepted_per_step == pytest.approx(stats.accepted / stats.row_steps)
    assert stats.tokens_per_step == pytest.approx(stats.step_tokens / stats.row_steps)
    if which == "trained":
        assert stats.acceptance_rate > 0.9
    if which == "trained-noisy":
        assert 0.2 < stats.acceptance_rate < 0.95


def test_batched_speculative_needs_fewer_main_forwards_than_tokens(trained):
    """With drafts accepted, the batch emits more tokens per row than the main model runs forwards:
    forwards counted with a hook on the first main-model block (prefill + one verify per step)."""
    model, pattern = trained
    prompts = trained_prompts_8(pattern)
    forwards = []
    handle = model.layers[0].register_forward_hook(lambda *a: forwards.append(a[1][0].shape[0]))
    try:
        spec = generate(model, prompts, 24, speculative="mtp")
        n_spec = len(forwards)
        plain = generate(model, prompts, 24)
        n_plain = len(forwards) - n_spec
    finally:
        handle.remove()
    assert spec.tokens == plain.tokens and all(len(t) == 24 for t in spec.tokens)
    assert set(forwards) == {8}  # every forward ran the whole batch
    assert n_plain == 24 == 1 + plain.stats.steps
    assert n_spec == 1 + spec.stats.steps
    assert spec.stats.accepted > 0 and n_spec < 24  # fewer forwards than tokens emitted per row
    assert spec.stats.row_steps <= 8 * spec.stats.steps
    assert spec.stats.tokens_per_step > 2  # per row per step: 1 + accepted drafts (2 depths)
    print(f"batched speculative, 8 rows: {n_spec} main forwards for 24 tokens a row: {spec.stats.as_dict()}")


def test_drafts_match_the_mtp_training_path():
    """The cached drafter, stepped as generation steps it (accepting 0, 1 or 2 tokens at a time and
    so invalidating draft-built MTP cache entries), drafts exactly what the uncached MTP chain of
    Transformer training computes at the last position of the sequence extended by the drafts."""
    model = random_model(depths=2, seed=5)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, model.cfg.vocab_size, (20,), generator=g)
    cache = model.make_cache(1, 20)
    drafter = MTPDrafter(model, 20)
    n_tok = 5
    drafter.record_main_hidden(0, model.hidden_cached(ids[None, : n_tok - 1], cache, 0))
    for advance in (1, 2, 1, 3, 1, 2, 2):
        drafts = drafter.draft(ids[None, :n_tok]).tokens[0].tolist()
        assert drafts == reference_drafts(model, ids[:n_tok].tolist())
        new = ids[n_tok - 1 : n_tok - 1 + advance][None]  # feed t[n_tok-1] and the accepted ones
        drafter.record_main_hidden(n_tok - 1, model.hidden_cached(new, cache, n_tok - 1))
        n_tok += advance


@pytest.mark.parametrize("which", ["random", "trained-noisy"])
def test_generate_drafts_match_the_mtp_training_path(which, trained, monkeypatch):
    """Inside generate (ragged prefill, batched verify, per-row partial acceptance), every row's
    drafts equal the training-path reference: the main hidden states handed to the drafter are the
    right ones at the right positions. The noisy fitted model (float64) accepts 0..2 drafts per row
    and step, so several hidden states per row are recorded at once."""
    if which == "random":
        model = random_model(depths=2, seed=8)
        prompts = prompts_for(model.cfg.vocab_size, seed=9)
    else:
        model = noisy_copy(trained[0]).double()
        prompts = trained_prompts_8(trained[1])
    calls = []

    class CheckedDrafter(gen.MTPDrafter):
        def draft(self, tokens, lengths=None, sample_probs=None, generator=None):
            out = super().draft(tokens, lengths, sample_probs, generator)
            for row, n in enumerate(lengths.tolist()):
                assert out.tokens[row].tolist() == reference_drafts(model, tokens[row, :n].tolist())
                calls.append(n)
            return out

    monkeypatch.setattr(gen, "MTPDrafter", CheckedDrafter)
    stats = generate(model, prompts, 10, speculative="mtp").stats
    assert len(calls) == len(prompts) * stats.steps  # every row, every batched drafting call
    if which == "trained-noisy":
        assert stats.accepted > stats.row_steps / 2  # multi-token acceptance did happen


def reference_drafts(model, tokens: list[int]) -> list[int]:
    """Training path: depth k at position j reads h_{k-1}[j] and emb(t[j+k]); drafts come from the
    last main position j = N-2, each depth's guess appended before the next depth runs."""
    with torch.no_grad():
        ext = list(tokens)
        last = len(tokens) - 2
        h = model.embed(torch.tensor([tokens[: last + 1]]))
        for block in model.layers:
            h = block(h)
        for k, module in enumerate(model.mtp, start=1):
            h = module(h, model.embed(torch.tensor([ext[k : last + 1 + k]])))
            ext.append(int(model.head(module.norm(h[0, -1])).argmax()))
    return ext[len(tokens) :]


def test_speculative_sampling_top_k_1_is_greedy(trained):
    model, pattern = trained
    prompts = trained_prompts(pattern)
    plain = generate(model, prompts, 16)
    spec = generate(model, prompts, 16, speculative="mtp", temperature=0.8, top_k=1, seed=3)
    assert spec.tokens == plain.tokens


def test_speculative_sampling_is_reproducible(trained):
    model, pattern = trained
    prompts = trained_prompts(pattern)
    a = generate(model, prompts, 16, speculative="mtp", temperature=1.5, seed=7)
    b = generate(model, prompts, 16, speculative="mtp", temperature=1.5, seed=7)
    assert a.tokens == b.tokens and all(len(t) == 16 for t in a.tokens)
    assert a.stats.drafted > 0


@pytest.mark.parametrize("speculative", ["none", "mtp"])
def test_sampling_ragged_batch_is_reproducible(speculative):
    model = random_model(depths=2, seed=15)
    prompts = prompts_for(model.cfg.vocab_size, seed=16, lengths=RAGGED_8)
    a = generate(model, prompts, 10, temperature=1.0, top_p=0.95, seed=21, speculative=speculative)
    b = generate(model, prompts, 10, temperature=1.0, top_p=0.95, seed=21, speculative=speculative)
    c = generate(model, prompts, 10, temperature=1.0, top_p=0.95, seed=22, speculative=speculative)
    assert a.tokens == b.tokens and all(len(t) == 10 for t in a.tokens)
    assert a.tokens != c.tokens
    # top_k 1 makes every draw the argmax: sampling (and speculative sampling) collapses to greedy
    greedy = generate(model, prompts, 10).tokens
    assert generate(model, prompts, 10, temperature=0.7, top_k=1, speculative=speculative).tokens == greedy


def test_batched_greedy_acceptance_stops_at_each_rows_draft_count():
    target = torch.zeros(3, 3, 5)  # [rows, n + 1, vocab]: argmax 1, 2, 3 at positions 0, 1, 2
    target[:, 0, 1] = target[:, 1, 2] = target[:, 2, 3] = 1.0
    drafts = torch.tensor([[1, 2], [1, 2], [1, 4]])  # rows 0, 1 match both; row 2 only the first
    accepted, nxt = accept_greedy_batch(target, drafts, torch.tensor([2, 1, 2]))
    assert accepted.tolist() == [2, 1, 1]  # row 1 may verify only one draft
    assert nxt.tolist() == [3, 2, 2]


def test_batched_acceptance_rule_keeps_each_rows_target_distribution():
    """accept_sampled_batch over 30000 rows at once, in three groups verifying 2, 1 and 0 of their
    2 drafts: the first emitted token of every group is distributed as the target p_0."""
    p = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [1 / 3, 1 / 3, 1 / 3]])  # [n + 1, vocab]
    q = torch.tensor([[0.2, 0.2, 0.6], [0.5, 0.25, 0.25]])  # [n, vocab]
    g = torch.Generator().manual_seed(0)
    rows = 30000
    drafts = torch.multinomial(q, rows, replacement=True, generator=g).T  # [rows, 2]
    n_valid = torch.arange(rows) % 3  # 0, 1, 2
    accepted, nxt = accept_sampled_batch(p.expand(rows, 3, 3), q.expand(rows, 2, 3), drafts, n_valid, g)
    assert bool((accepted <= n_valid).all()) and bool((accepted[n_valid == 0] == 0).all())
    first = torch.where(accepted > 0, drafts[:, 0], nxt)  # [rows]
    for n in range(3):
        freq = torch.bincount(first[n_valid == n], minlength=3) / (rows / 3)
        assert torch.allclose(freq, p[0], atol=0.02), (n, freq)
    # all of a row's valid drafts accepted: the bonus comes from p at that position
    both = (n_valid == 2) & (accepted == 2)
    freq = torch.bincount(nxt[both], minlength=3) / both.sum()
    assert torch.allclose(freq, p[2], atol=0.03), freq


def test_speculative_acceptance_rule_keeps_the_target_distribution():
    """One draft on a 3-token vocabulary: the emitted token's frequency is p, whatever q is."""
    p = torch.tensor([[0.6, 0.3, 0.1], [1 / 3, 1 / 3, 1 / 3]])  # row 1: the bonus distribution
    q = torch.tensor([[0.2, 0.2, 0.6]])
    g = torch.Generator().manual_seed(0)
    trials = 10000
    counts = torch.zeros(3)
    for _ in range(trials):
        d = int(torch.multinomial(q[0], 1, generator=g))
        accepted, nxt = accept_sampled(p, q, [d], g)
        counts[d if accepted else nxt] += 1
    assert torch.allclose(counts / trials, p[0], atol=0.02), counts / trials


# --- sampling ---------------------------------------------------------------------------------------------
def test_sampling_seed_top_k_and_top_p():
    model = random_model()
    prompts = prompts_for(model.cfg.vocab_size)
    a = generate(model, prompts, 8, temperature=1.0, seed=11).tokens
    assert a == generate(model, prompts, 8, temperature=1.0, seed=11).tokens
    assert a != generate(model, prompts, 8, temperature=1.0, seed=12).tokens
    greedy = generate(model, prompts, 8).tokens
    assert generate(model, prompts, 8, temperature=1.3, top_k=1, seed=5).tokens == greedy

    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = torch.isfinite(filter_top_p(logits, 0.7))
    assert kept.tolist() == [True, True, False, False]  # 0.5 < 0.7 <= 0.5 + 0.3
    assert torch.isfinite(filter_top_p(logits, 0.01)).sum() == 1  # the top token always stays
    probs = probabilities(logits, 1.0, top_k=3, top_p=0.9)
    assert torch.allclose(probs, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    g = torch.Generator().manual_seed(0)
    draws = sample(logits.expand(500, 4), g, temperature=1.0, top_p=0.7)
    assert set(draws.tolist()) == {0, 1}


# --- errors before work ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompts": [[1] * 65]}, "longer than the context"),
        ({"prompts": [[1] * 60], "max_new_tokens": 10}, "exceeds the context"),
        ({"prompts": [[1, 64]]}, "outside the vocabulary"),
        ({"prompts": [[1, -1]]}, "outside the vocabulary"),
        ({"prompts": [[]]}, "prompt 0 is empty"),
        ({"speculative": "mtp", "no_mtp": True}, "needs MTP modules"),
        ({"speculative": "eagle"}, "speculative must be one of"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"eos_id": 99}, "eos_id"),
    ],
)
def test_bad_inputs_fail_with_the_cause(kwargs, message):
    model = build_model(small_cfg(num_nextn_predict_layers=0 if kwargs.pop("no_mtp", False) else 1), seed=0)
    args = {"prompts": [[1, 2, 3]], "max_new_tokens": 4, **kwargs}
    calls = []
    with pytest.raises(ValueError, match=message):
        generate(
            model,
            args.pop("prompts"),
            args.pop("max_new_tokens"),
            on_token=lambda *a: calls.append(a),
            **args,
        )
    assert calls == []
