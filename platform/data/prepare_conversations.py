"""`moeforge-prepare format=conversations`: chat records -> packed rows with loss masks and segments.

    Ray Data workers, per input file: parse the `messages` records, render each with the chat
      template, tokenize, mask all but the assistant answers (`conversations.encode_conversation`),
      cut to seq_len + 1
    driver, in input order, per split: pack greedily into rows of seq_len + 1 (`packing.RowPacker`) and write
      shards of whole rows, three streams each (`packed_writer.RowWriter`) -> manifest.json last

The manifest is `prepare.prepare`'s, plus `"kind": "conversations"`, `seq_len`, the chat template's hash,
the extra streams' dtypes, and per split the rows, trained tokens and the extra streams' shards.
Resuming and "a complete output does nothing" work as for text (`prepare.prepare`,
`packed_writer.PackedProgress`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np
from moeforge.platform.data.chat_template import ChatTemplate
from moeforge.platform.data.conversations import encode_conversation, fit_to_row, parse_conversations
from moeforge.platform.data.corpus import CorpusError, InputFile
from moeforge.platform.data.packed_writer import PackedProgress, RowWriter
from moeforge.platform.data.packing import RowPacker, segment_dtype
from moeforge.platform.data.prepare import (
    TOKENIZER_FILE,
    PrepareConfig,
    PrepareResult,
    PrepareTally,
    RaySession,
    input_error,
    is_val_document,
    map_files,
    note_empty_val,
    remove_stale_shards,
    resolved_dtype,
)
from moeforge.platform.data.shards import DTYPES, EXTRA_STREAMS, FORMAT, MANIFEST
from moeforge.platform.data.tokenizer import eos_id, tokenizer_hash
from moeforge.platform.data.writer import PROGRESS, SPLITS
from moeforge.platform.outputs.storage import Storage

_TOKENIZERS: dict[str, object] = {}  # per worker process: tokenizer hash -> Tokenizer

# --- worker side ---------------------------------------------------------------------------------


def encode_file(uri: str, kind: str, data: bytes, tok, template: ChatTemplate, cfg: PrepareConfig) -> dict:
    """One file's conversations, encoded, masked and cut to seq_len + 1, per split (the seeded
    per-document hash of `prepare.is_val_document`): `{split}`: token ids, `{split}_mask`, `{split}_lengths`
    (int64 arrays; the conversations back to back), `{split}_truncated`: how many were cut."""
    row_len = cfg.seq_len + 1
    out = {}
    parts = {s: ([], [], []) for s in SPLITS}
    truncated = dict.fromkeys(SPLITS, 0)
    for j, conv in enumerate(parse_conversations(uri, kind, data)):
        ids, mask = encode_conversation(conv, template, tok)
        split = "val" if is_val_document(cfg.seed, uri, j, cfg.val_fraction) else "train"
        truncated[split] += len(ids) > row_len
        ids, mask = fit_to_row(conv, ids, mask, row_len)
        parts[split][0].append(ids)
        parts[split][1].append(mask)
        parts[split][2].append(len(ids))
    for split, (ids, masks, lengths) in parts.items():
        out[split] = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        out[split + "_mask"] = np.concatenate(masks) if masks else np.zeros(0, dtype=np.uint8)
        out[split + "_lengths"] = np.array(lengths, dtype=np.int64)
        out[split + "_truncated"] = truncated[split]
    return out


def _encode_batch(batch: dict, tokenizer_json: str, tokenizer_sha: str, template: ChatTemplate,
                  dtype: str, cfg: PrepareConfig) -> dict:
    """Ray Data UDF: a batch of files (index, uri, kind, data) -> per file and split its token ids,
    masks and conversation lengths as bytes, and its counts."""
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # this task holds one CPU; no extra threads
    tok = _TOKENIZERS.get(tokenizer_sha)
    if tok is None:
        tok = _TOKENIZERS[tokenizer_sha] = Tokenizer.from_str(tokenizer_json)
    columns = [f"{s}{suffix}" for s in SPLITS for suffix in ("", "_mask", "_lengths")]
    out = {"index": [], "counts": [], "error": [], **{c: [] for c in columns}}
    for index, uri, kind, data in zip(batch["index"], batch["uri"], batch["kind"], batch["data"]):
        try:
            result, error = encode_file(str(uri), str(kind), bytes(data), tok, template, cfg), ""
        except CorpusError as err:  # bad input travels as data (prepare.map_files)
            result, error = encode_file(str(uri), "jsonl", b"", tok, template, cfg), str(err)
        out["error"].append(error)
        out["index"].append(int(index))
        out["train"].append(result["train"].astype(DTYPES[dtype]).tobytes())
        out["val"].append(result["val"].astype(DTYPES[dtype]).tobytes())
        for s in SPLITS:
            out[s + "_mask"].append(result[s + "_mask"].tobytes())
            out[s + "_lengths"].append(result[s + "_lengths"].tobytes())
        out["counts"].append([len(result["train"]), len(result["val"]), len(result["train_lengths"]),
                              len(result["val_lengths"]), result["train_truncated"], result["val_truncated"]])
    return {
        "index": np.array(out["index"], dtype=np.int64),
        "counts": np.array(out["counts"], dtype=np.int64).reshape(-1, 6),  # [files, 6]
        "error": np.array(out["error"], dtype=object),
        **{c: np.array(out[c], dtype=object) for c in columns},
    }


# --- driver side ---------------------------------------------------------------------------------


def prepare_conversations(
    cfg: PrepareConfig,
    files: list[InputFile],
    tok,
    template: ChatTemplate,
    storage: Storage,
    fp: str,
    log: Callable[[str], None],
    on_shard: Callable[[str, dict], None] | None,
) -> PrepareResult:
    """Prepare cfg.output from conversation files (see the module docstring); called by prepare.prepare
    once the output is known to be incomplete."""
    text_files = [f.uri for f in files if f.kind == "text"]
    if text_files:
        raise CorpusError(f"{text_files[0]}: format=conversations reads JSONL or Parquet records, not text files")
    row_len = cfg.seq_len + 1
    shard_rows = max(1, cfg.shard_tokens // row_len)
    dtypes = {"tokens": resolved_dtype(cfg, tok.get_vocab_size()), "loss_mask": "uint8",
              "segments": segment_dtype(row_len)}
    pad = eos_id(tok)

    progress = PackedProgress.load(storage, fp)
    if progress is not None and not (progress.shards_intact(storage) and storage.exists(TOKENIZER_FILE)):
        log("prepare: the earlier run's shards are not all intact; starting afresh")
        progress = None
    if progress is None:
        storage.delete(PROGRESS)
        progress = PackedProgress(fp)
    storage.write_text(TOKENIZER_FILE, tok.to_str())
    for name, text in template.files:  # the template travels with the data (moeforge-generate, audits)
        storage.write_text(name, text)
    restart, resume = progress.restart()
    skipped = len(progress.shards["train"]) + len(progress.shards["val"])
    if skipped:
        log(f"prepare: resuming after {skipped} finished shards, from input file {restart}/{len(files)}")

    tally = PrepareTally(restart, len(files), log, on_shard)

    def shard_done(split: str, entry: dict) -> None:
        progress.resume[split] = list(writers[split].resume)
        progress.save(storage)  # after the shard itself: a recorded shard always exists
        tally.shard_written(split, entry, f"{entry['num_tokens'] // row_len:,} rows")

    packers = {s: RowPacker(row_len, pad, resume[s]) for s in SPLITS}
    writers = {
        s: RowWriter(storage, s, dtypes, shard_rows, lambda s=s: packers[s].pending_start,
                     progress.shards[s], progress.streams[s], shard_done)
        for s in SPLITS
    }
    progress.shards = {s: writers[s].shards for s in SPLITS}  # one list: the writers append, progress saves
    progress.streams = {s: writers[s].streams for s in SPLITS}
    token_dtype = np.dtype(DTYPES[dtypes["tokens"]])

    def consume(row: dict) -> None:
        index = int(row["index"])
        if index != len(progress.file_tokens):  # rows must follow input order to be reproducible
            raise RuntimeError(f"Ray Data returned input file {index} out of order")
        counts = [int(c) for c in row["counts"]]
        progress.file_tokens.append(counts)
        tally.file_read(index, counts[0] + counts[1])
        for split in SPLITS:
            ids = np.frombuffer(bytes(row[split]), dtype=token_dtype)
            mask = np.frombuffer(bytes(row[split + "_mask"]), dtype=np.uint8)
            ends = np.cumsum(np.frombuffer(bytes(row[split + "_lengths"]), dtype=np.int64))
            for j, end in enumerate(ends):
                if (index, j) < resume[split]:  # already in finished shards
                    continue
                begin = int(ends[j - 1]) if j else 0
                writers[split].add(packers[split].add(ids[begin:end].astype(np.int64), mask[begin:end], (index, j)))
            packers[split].file_done(index)

    try:
        with RaySession(cfg.num_cpus) as ray:
            tally.start()  # throughput excludes cluster start-up
            fn_kwargs = {"tokenizer_json": tok.to_str(), "tokenizer_sha": tokenizer_hash(tok), "template": template,
                         "dtype": dtypes["tokens"], "cfg": cfg}
            map_files(ray, files, restart, cfg, _encode_batch, fn_kwargs, consume)
    except Exception as err:  # noqa: BLE001 -- re-raised; Ray wraps input errors raised in workers
        raise input_error(err) from None
    for split in SPLITS:
        writers[split].add(packers[split].flush())
        writers[split].close()
    tokenize_s = tally.seconds()

    manifest = _manifest(cfg, files, tok, template, dtypes, shard_rows * row_len, pad, fp, progress)
    remove_stale_shards(storage, manifest)
    storage.write_text(MANIFEST, json.dumps(manifest, indent=1))  # last: marks the output complete
    storage.delete(PROGRESS)
    splits = manifest["splits"]
    log(f"prepare: done: {splits['train']['num_rows']:,} train + {splits['val']['num_rows']:,} val rows of "
        f"seq_len + 1 = {row_len} tokens ({splits['train']['num_docs']:,} + {splits['val']['num_docs']:,} "
        f"conversations, {splits['train']['trained_tokens']:,} + {splits['val']['trained_tokens']:,} trained tokens) "
        f"-> {storage.url(MANIFEST)}")
    truncated = splits["train"]["truncated_docs"] + splits["val"]["truncated_docs"]
    if truncated:
        log(f"prepare: note: {truncated} conversations were longer than seq_len + 1 = {row_len} tokens and were cut")
    note_empty_val(cfg, manifest, log)
    return PrepareResult(storage.url(), manifest, False, tally.written, skipped, tally.tokens, tokenize_s)


def _manifest(cfg, files, tok, template: ChatTemplate, dtypes: dict, shard_tokens: int, pad: int, fp: str,
              progress: PackedProgress) -> dict:
    counts = np.array(progress.file_tokens, dtype=np.int64).reshape(-1, 6)  # [files, 6]
    row_len = cfg.seq_len + 1
    splits = {}
    for col, split in enumerate(SPLITS):
        shards, streams = progress.shards[split], progress.streams[split]
        num_tokens = sum(s["num_tokens"] for s in shards)
        for name in EXTRA_STREAMS:
            if sum(s["num_tokens"] for s in streams[name]) != num_tokens or len(streams[name]) != len(shards):
                raise RuntimeError(f"{split}: the {name} shards do not match the token shards")
        if num_tokens % row_len:
            raise RuntimeError(f"{split}: {num_tokens} tokens are not whole rows of {row_len}")
        splits[split] = {
            "num_tokens": num_tokens,
            "num_rows": num_tokens // row_len,
            "num_docs": int(counts[:, col + 2].sum()),
            "trained_tokens": sum(s["trained_tokens"] for s in streams["loss_mask"]),
            "truncated_docs": int(counts[:, col + 4].sum()),
            "shards": shards,
            **{name: streams[name] for name in EXTRA_STREAMS},
        }
    return {
        "format": FORMAT,
        "kind": "conversations",
        "fingerprint": fp,
        "dtype": dtypes["tokens"],
        "shard_tokens": shard_tokens,
        "seq_len": cfg.seq_len,
        "vocab_size": tok.get_vocab_size(),
        "eos_id": pad,
        "tokenizer": {"path": TOKENIZER_FILE, "sha256": tokenizer_hash(tok), "source": cfg.tokenizer},
        "chat_template": {"files": [name for name, _ in template.files], "sha256": template.sha256,
                          "source": template.source},
        "streams": {name: dtypes[name] for name in EXTRA_STREAMS},
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "sources": [{"uri": f.uri, "kind": f.kind, "bytes": f.size} for f in files],
        "splits": splits,
    }
