"""Shard writing, the resume bookkeeping, dtype limits and the shard reader, without Ray."""

from __future__ import annotations

import numpy as np
import pytest
from moeforge.platform.data.shards import ShardError, TokenStream, check_vocab_fits, dtype_for_vocab
from moeforge.platform.data.writer import Progress, SplitWriter
from moeforge.platform.outputs.storage import LocalStorage


def test_dtype_follows_the_vocab_and_overflow_is_refused():
    assert dtype_for_vocab(4096) == "uint16" and dtype_for_vocab(65536) == "uint16"
    assert dtype_for_vocab(65537) == "uint32"
    check_vocab_fits(65536, "uint16")
    with pytest.raises(ValueError, match="vocab_size 65537 overflows uint16"):
        check_vocab_fits(65537, "uint16")


def test_writer_cuts_fixed_size_shards_and_a_stream_reads_across_them(tmp_path):
    storage = LocalStorage(str(tmp_path))
    seen = []
    writer = SplitWriter(storage, "train", "uint32", 7, on_shard=lambda split, e: seen.append(e["path"]))
    tokens = np.arange(100_000, 100_023, dtype=np.int64)  # needs uint32
    for part in np.split(tokens, [3, 4, 15]):
        writer.add(part)
    writer.close()
    assert [s["num_tokens"] for s in writer.shards] == [7, 7, 7, 2]
    assert seen == ["train/00000.bin", "train/00001.bin", "train/00002.bin", "train/00003.bin"]
    assert [s["first_token"] for s in writer.shards] == [0, 7, 14, 21]
    stream = TokenStream([str(tmp_path / s["path"]) for s in writer.shards], "uint32")
    assert np.array_equal(stream.read(0, 23), tokens) and np.array_equal(stream.read(5, 10), tokens[5:15])
    with pytest.raises(IndexError):
        stream.read(20, 4)


def test_resume_point_restarts_at_the_first_file_not_fully_in_finished_shards():
    progress = Progress("fp")
    # per file: [train tokens, val tokens, train docs, val docs]
    progress.file_tokens = [[5, 0, 1, 0], [4, 3, 1, 1], [6, 0, 1, 0], [2, 2, 1, 1]]
    progress.shards = {"train": [{"num_tokens": 8}], "val": [{"num_tokens": 3}]}
    restart, drop = progress.resume_point()
    # train's finished 8 tokens end inside file 1; val's 3 tokens are all of file 1's
    assert restart == 1 and drop == {"train": 3, "val": 3}
    assert progress.file_tokens == [[5, 0, 1, 0]]


def test_skip_drops_tokens_already_in_finished_shards(tmp_path):
    storage = LocalStorage(str(tmp_path))
    done = [{"path": "train/00000.bin", "first_token": 0, "num_tokens": 4, "bytes": 8, "sha256": "x"}]
    writer = SplitWriter(storage, "train", "uint16", 4, done=done)
    writer.skip(3)
    writer.add(np.array([1, 2, 3, 4, 5, 6], dtype=np.int64))  # 1..3 are in the finished shard
    writer.close()
    assert [s["first_token"] for s in writer.shards] == [0, 4]
    assert np.array_equal(np.fromfile(tmp_path / "train" / "00001.bin", dtype=np.uint16), [4, 5, 6])


def test_flat_token_file_with_a_ragged_size_is_named(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x00" * 5)
    with pytest.raises(ShardError, match="odd.bin: size 5 bytes is not a multiple of uint16"):
        TokenStream.from_file(str(path), "uint16")
    with pytest.raises(ShardError, match="nope.bin: token file not found"):
        TokenStream.from_file(str(tmp_path / "nope.bin"), "uint16")
