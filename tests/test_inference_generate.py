"""platform/inference: cached decoding against the uncached forward, MTP speculative decoding against
plain decoding, the drafting alignment against the MTP training path, sampling and input errors."""

from __future__ import annotations

import copy

import pytest
import torch
from moeforge.model.accounting import estimate
from moeforge.model.config import ModelConfig
from moeforge.model.transformer import build_model
from moeforge.platform.inference import generate as gen
from moeforge.platform.inference.generate import generate
from moeforge.platform.inference.sampling import filter_top_p, probabilities, sample
from moeforge.platform.inference.speculative import MTPDrafter, accept_sampled

torch.set_num_threads(1)

PROMPT_LENGTHS = (3, 7, 7, 12)  # ragged, with one repeated length (a shared cohort)


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


def prompts_for(vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


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


# --- cached decoding ----------------------------------------------------------------------------------
def test_cached_greedy_matches_uncached_reference():
    model = random_model()
    prompts = prompts_for(model.cfg.vocab_size)
    out = generate(model, prompts, 10)
    assert out.tokens == [greedy_reference(model, p, 10) for p in prompts]
    assert out.stats.tokens_generated == 40 and out.stats.prefill_forwards == 3  # lengths 3, 7, 12
    assert out.stats.steps == 3 * 9 and out.stats.tokens_per_step == pytest.approx(4 / 3)


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
        drafts = drafter.draft(ids[:n_tok]).tokens
        assert drafts == reference_drafts(model, ids[:n_tok].tolist())
        new = ids[n_tok - 1 : n_tok - 1 + advance][None]  # feed t[n_tok-1] and the accepted ones
        drafter.record_main_hidden(n_tok - 1, model.hidden_cached(new, cache, n_tok - 1))
        n_tok += advance


def test_generate_drafts_match_the_mtp_training_path(monkeypatch):
    """Inside generate (prefill, verify, partial acceptance), every draft equals the training-path
    reference: the main hidden states handed to the drafter are the right ones at the right positions."""
    model = random_model(depths=2, seed=8)
    calls = []

    class CheckedDrafter(gen.MTPDrafter):
        def draft(self, tokens, sample_probs=None, generator=None):
            out = super().draft(tokens, sample_probs, generator)
            assert out.tokens == reference_drafts(model, tokens.tolist())
            calls.append(len(tokens))
            return out

    monkeypatch.setattr(gen, "MTPDrafter", CheckedDrafter)
    generate(model, prompts_for(model.cfg.vocab_size, seed=9), 10, speculative="mtp")
    assert len(calls) >= 4 * 9


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
