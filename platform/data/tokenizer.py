"""Byte-level BPE tokenizers: train one on the corpus (`tokenizers`), or load a tokenizer.json.

Byte-level means every byte string is encodable (no unknown token), which suits source code. Each
document is followed by one end-of-text token, so packed training windows see document boundaries.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence

import numpy as np
from moeforge.platform.data.corpus import CorpusError
from moeforge.platform.outputs.storage import S3Options, is_s3, open_storage
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
_EOS_CANDIDATES = (EOS, "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer with at most `vocab_size` ids (fewer when the corpus is too small
    to supply that many merges); id 0 is the end-of-text token."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise CorpusError(f"vocab_size: {vocab_size} is too small for byte-level BPE (needs > {len(alphabet)})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: str, s3: S3Options | None = None) -> Tokenizer:
    """A tokenizer.json from a local path or an s3:// URL."""
    try:
        if is_s3(path):
            parent, _, name = path.rpartition("/")
            return Tokenizer.from_str(open_storage(parent, s3).read_text(name))
        if not os.path.isfile(path):
            raise CorpusError(f"{path}: tokenizer file not found")
        return Tokenizer.from_file(path)
    except FileNotFoundError:
        raise CorpusError(f"{path}: tokenizer file not found") from None
    except Exception as err:
        if isinstance(err, CorpusError):
            raise
        raise CorpusError(f"{path}: not a valid tokenizer.json ({str(err).splitlines()[0]})") from None


def tokenizer_hash(tok: Tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON: two runs with equal hashes tokenize identically."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def eos_id(tok: Tokenizer) -> int:
    for name in _EOS_CANDIDATES:
        index = tok.token_to_id(name)
        if index is not None:
            return index
    raise CorpusError(f"tokenizer: no end-of-text token (looked for {', '.join(_EOS_CANDIDATES)})")


def encode_documents(tok: Tokenizer, docs: Sequence[str], eos: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, doc_lengths): all documents' ids, each followed by `eos`, as one int64 array."""
    if not docs:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    encodings = tok.encode_batch(list(docs), add_special_tokens=False)
    lengths = np.array([len(e.ids) + 1 for e in encodings], dtype=np.int64)
    out = np.empty(int(lengths.sum()), dtype=np.int64)
    pos = 0
    for enc, n in zip(encodings, lengths):
        out[pos : pos + n - 1] = enc.ids
        out[pos + n - 1] = eos
        pos += n
    return out, lengths
