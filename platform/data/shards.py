"""Memory-mapped token shards: the manifest format, its checks, and a reader over a split.

A prepared token directory looks like

    manifest.json            written last: its presence marks the whole directory complete
    tokenizer.json
    train/00000.bin ...      fixed-size shards of little-endian uint16 (or uint32) token ids
    val/00000.bin ...

`manifest.json` records the dtype, shard size, vocab size, tokenizer hash, sources, and per split the
shards in order with their token counts, byte sizes and sha256. A split is read as one concatenated
token stream (documents inside it are separated by the EOS token).

A directory of packed conversations (`"kind": "conversations"`, see `packed_rows.PackedRows`) has, beside each
token shard, a loss-mask shard and a segment shard of the same token count (`train/00000.loss_mask.bin`,
`train/00000.segments.bin`), listed per split under the stream's name with their own sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "moeforge-tokens/1"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}  # token ids
STREAM_DTYPES = {"uint8": np.uint8, **DTYPES}  # any shard: token ids, loss masks, segment indices
EXTRA_STREAMS = ("loss_mask", "segments")  # the per-token streams beside a conversations manifest's tokens


class ShardError(RuntimeError):
    """A token file or shard is missing, truncated or corrupt; the message names the path."""


def dtype_for_vocab(vocab_size: int) -> str:
    """The smallest shard dtype that holds every id of a vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def check_vocab_fits(vocab_size: int, dtype: str) -> None:
    """Refuse a vocabulary whose largest id does not fit the shard dtype."""
    limit = int(np.iinfo(DTYPES[dtype]).max) + 1
    if vocab_size > limit:
        raise ValueError(f"vocab_size {vocab_size} overflows {dtype} shards (at most {limit} ids)")


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the prepared directory
    num_tokens: int
    sha256: str


def read_manifest(root: str) -> dict:
    """The manifest of a prepared directory; a missing or unreadable one fails naming the path."""
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        raise ShardError(f"{path}: no manifest (not a prepared token directory, or preparation is incomplete)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ShardError(f"{path}: unreadable manifest ({err})") from None
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    return manifest


def split_shards(manifest: dict, split: str, stream: str = "shards") -> list[ShardInfo]:
    """A split's shards of one stream: "shards" (token ids) or one of EXTRA_STREAMS."""
    entry = manifest.get("splits", {}).get(split)
    if entry is None:
        return []
    return [ShardInfo(s["path"], int(s["num_tokens"]), s["sha256"]) for s in entry.get(stream, [])]


def all_shard_entries(manifest: dict) -> list[dict]:
    """Every shard entry the manifest lists: each split's token shards and its extra streams' shards."""
    return [entry for split in manifest.get("splits", {}).values()
            for stream in ("shards", *EXTRA_STREAMS) for entry in split.get(stream, [])]


def verify_shard(root: str, shard: ShardInfo, dtype: str, hash_check: bool) -> str:
    """Check one shard against its manifest entry; return its absolute path."""
    path = os.path.join(root, shard.path)
    if not os.path.isfile(path):
        raise ShardError(f"{path}: shard listed in the manifest is missing")
    expected = shard.num_tokens * np.dtype(STREAM_DTYPES[dtype]).itemsize
    size = os.path.getsize(path)
    if size != expected:
        raise ShardError(f"{path}: size {size} bytes, manifest says {expected} ({shard.num_tokens} tokens)")
    if hash_check and sha256_file(path) != shard.sha256:
        raise ShardError(f"{path}: sha256 mismatch with the manifest (corrupt shard)")
    return path


class TokenStream:
    """One read-only token sequence made of memory-mapped files, read by global offset."""

    def __init__(self, paths: list[str], dtype: str) -> None:
        self.dtype = dtype
        self.arrays = [np.memmap(p, dtype=STREAM_DTYPES[dtype], mode="r") for p in paths if os.path.getsize(p)]
        sizes = [len(a) for a in self.arrays]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.num_tokens = int(self.starts[-1])

    @classmethod
    def from_file(cls, path: str, dtype: str) -> TokenStream:
        """A single flat token file (e.g. a nanoGPT-style train.bin)."""
        if not os.path.isfile(path):
            raise ShardError(f"{path}: token file not found")
        itemsize = np.dtype(DTYPES[dtype]).itemsize
        size = os.path.getsize(path)
        if size % itemsize:
            raise ShardError(f"{path}: size {size} bytes is not a multiple of {dtype} ({itemsize} bytes)")
        return cls([path], dtype)

    @classmethod
    def from_prepared(cls, root: str, split: str, hash_check: bool = True, stream: str = "shards") -> TokenStream:
        """A split of a prepared directory, every shard checked against the manifest first: its token
        ids, or (stream = "loss_mask" | "segments") a conversations manifest's per-token stream."""
        manifest = read_manifest(root)
        dtype = manifest["dtype"] if stream == "shards" else manifest["streams"][stream]
        paths = [verify_shard(root, s, dtype, hash_check) for s in split_shards(manifest, split, stream)]
        return cls(paths, dtype)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, crossing shard boundaries as needed."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"token range [{start}, {start + length}) outside [0, {self.num_tokens})")
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while filled < length:
            offset = start + filled - int(self.starts[shard])
            take = min(length - filled, len(self.arrays[shard]) - offset)
            out[filled : filled + take] = self.arrays[shard][offset : offset + take]
            filled += take
            shard += 1
        return out
