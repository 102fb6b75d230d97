"""Local copies of token data kept on S3: memory maps need local files.

`cached_tokens(url)` mirrors a prepared directory (or one flat token file) from S3 into the cache
folder and returns the local path. A file is fetched only when the local copy is missing or differs
from the remote manifest; every download lands under a temporary name and is renamed into place,
so concurrent workers on one node never see a partial file. The manifest is written last.
"""

from __future__ import annotations

import json
import os

from moeforge.platform.data.shards import MANIFEST, all_shard_entries
from moeforge.platform.outputs.storage import S3Options, open_storage, split_s3

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "moeforge", "tokens")


def cache_root(url: str, cache_dir: str | None) -> str:
    bucket, key = split_s3(url)
    return os.path.join(cache_dir or DEFAULT_CACHE, bucket, *[p for p in key.split("/") if p])


def cached_tokens(url: str, cache_dir: str | None = None, s3: S3Options | None = None) -> str:
    """The local path of an s3:// prepared directory or token file, downloading what is missing."""
    local = cache_root(url, cache_dir)
    parent, _, name = url.rstrip("/").rpartition("/")
    storage = open_storage(url, s3)
    if not storage.exists(MANIFEST):
        if not open_storage(parent, s3, check=False).exists(name):
            raise FileNotFoundError(f"{url}: no such token file or prepared directory (no {MANIFEST})")
        single = open_storage(parent, s3, check=False)
        if not os.path.isfile(local) or os.path.getsize(local) != single.size(name):
            single.download(name, local)
        return local
    remote = json.loads(storage.read_text(MANIFEST))
    old = {}
    if os.path.isfile(os.path.join(local, MANIFEST)):
        with open(os.path.join(local, MANIFEST)) as f:
            old_manifest = json.load(f)
        old = {s["path"]: s["sha256"] for s in all_shard_entries(old_manifest)}
    for shard in all_shard_entries(remote):  # token shards, and the loss masks and segments of conversations
        path = os.path.join(local, *shard["path"].split("/"))
        fresh = os.path.isfile(path) and os.path.getsize(path) == shard["bytes"]
        if not fresh or old.get(shard["path"]) != shard["sha256"]:
            storage.download(shard["path"], path)
    tokenizer = remote.get("tokenizer", {}).get("path")
    template_files = (remote.get("chat_template") or {}).get("files", [])  # packed conversations
    for name in [tokenizer, *template_files]:
        if name and storage.exists(name):
            storage.download(name, os.path.join(local, name))
    storage.download(MANIFEST, os.path.join(local, MANIFEST))
    return local
