"""BatchSource: determinism in (seed, step), dp slicing, learnable synthetic data, flat token files."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from moeforge.platform.config.builder import ConfigError
from moeforge.platform.config.data import DataConfig
from moeforge.platform.data import BatchSource

VOCAB, SEQ = 4096, 32


def test_synthetic_is_deterministic_in_seed_and_step():
    a, b = BatchSource(DataConfig(seed=1), VOCAB, SEQ), BatchSource(DataConfig(seed=1), VOCAB, SEQ)
    assert a.batch(5).shape == (8, SEQ + 1) and a.batch(5).dtype == torch.long
    assert torch.equal(a.batch(5), b.batch(5))
    assert not torch.equal(a.batch(5), a.batch(6))
    assert not torch.equal(a.batch(5), BatchSource(DataConfig(seed=2), VOCAB, SEQ).batch(5))
    assert not torch.equal(a.batch(0), a.val_batch(0))
    assert int(a.batch(0).max()) < VOCAB


def test_dp_slices_concatenate_to_the_global_batch():
    src = BatchSource(DataConfig(global_batch=8), VOCAB, SEQ)
    for dp in (1, 2, 4, 8):
        assert torch.equal(torch.cat([src.batch(3, r, dp) for r in range(dp)]), src.batch(3))


def _conditional_entropy(rows: np.ndarray) -> float:
    prev, nxt = rows[:, :-1].ravel().tolist(), rows[:, 1:].ravel().tolist()
    pairs, firsts = collections.Counter(zip(prev, nxt)), collections.Counter(prev)
    return -sum(n / len(prev) * np.log(n / firsts[p]) for (p, _), n in pairs.items())


def test_synthetic_tokens_are_low_entropy_and_learnable():
    src = BatchSource(DataConfig(global_batch=16), VOCAB, 64)
    rows = torch.cat([src.batch(s) for s in range(40)]).numpy()
    assert _conditional_entropy(rows) < 1.5  # uniform noise would be ln(4096) = 8.3 nats

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(VOCAB, 32), torch.nn.Linear(32, VOCAB))
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    losses = []
    for step in range(60):
        batch = src.batch(step)
        logits = model(batch[:, :-1])  # [batch, seq, vocab]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 8.0 and np.mean(losses[-5:]) < 4.0, losses[::10]


def test_flat_token_file_windows_and_val_tail(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)  # token value == its offset, so a window names its start
    path = tmp_path / "train.bin"
    tokens.tofile(path)
    cfg = DataConfig(source="tokens", path=str(path), global_batch=4, val_fraction=0.2, seed=3)
    src = BatchSource(cfg, 1024, 9)
    total = (1000 - 1) // 9  # windows of 10 tokens at stride 9
    assert src.num_samples == total - int(total * 0.2)
    seen = []
    for step in range(src.num_samples // 4):
        for row in src.batch(step).numpy():
            start = int(row[0])
            assert np.array_equal(row, tokens[start : start + 10].astype(np.int64))
            seen.append(start)
    assert len(set(seen)) == len(seen)  # one epoch: no window twice
    assert seen != sorted(seen)  # shuffled
    val_starts = src.val_batch(0)[:, 0].tolist()
    assert max(seen) < src.num_samples * 9 <= min(val_starts)  # val is the held-out tail
    assert torch.equal(src.batch(2), BatchSource(cfg, 1024, 9).batch(2))


def test_bad_token_paths_fail_naming_the_path(tmp_path):
    with pytest.raises(ConfigError, match="data.path: .*missing.bin does not exist"):
        BatchSource(DataConfig(source="tokens", path=str(tmp_path / "missing.bin")), VOCAB, SEQ)
    with pytest.raises(ConfigError, match="without manifest.json"):
        BatchSource(DataConfig(source="tokens", path=str(tmp_path)), VOCAB, SEQ)
    small = tmp_path / "small.bin"
    np.arange(100, dtype=np.uint16).tofile(small)
    with pytest.raises(ValueError, match=r"token id \d+ in .*small.bin is >= vocab_size 50"):
        BatchSource(DataConfig(source="tokens", path=str(small), global_batch=2), 50, 8).batch(0)


def test_a_text_file_given_as_token_ids_is_refused_naming_it(tmp_path):
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text('{"text": "def f(x):\\n    return x"}\n' * 200)
    raw = tmp_path / "corpus.txt"
    raw.write_text("Ein Satz über Tokens, mit Umlauten.\n" * 300)
    for path, kind in ((jsonl, "JSONL"), (raw, "text")):
        with pytest.raises(ConfigError) as err:
            BatchSource(DataConfig(source="tokens", path=str(path)), VOCAB, SEQ)
        assert str(err.value) == (
            f"data.path: {path} is {kind}, not token ids: tokenize it with moeforge-prepare "
            "'inputs=[<file>]' output=<dir>, and give that directory"
        )
    ids = tmp_path / "ids.bin"
    np.random.default_rng(0).integers(0, VOCAB, 4096, dtype=np.uint16).tofile(ids)
    assert BatchSource(DataConfig(source="tokens", path=str(ids), global_batch=2), VOCAB, SEQ).num_samples > 0
