"""`moeforge-prepare`: turn text, JSONL or Parquet files into token shards, tokenizing on Ray Data.

    discover inputs (driver) -> tokenizer (trained byte-level BPE, or a tokenizer.json)
      -> Ray Data: from_items(file bytes) .map_batches(parse + tokenize) across the cluster's CPUs
      -> driver, in input order: fixed-size uint16/uint32 shards per split, each written atomically
      -> manifest.json last (the completion marker)

`format=conversations` reads chat records instead and packs them into rows of seq_len + 1 tokens
with loss masks and segments (`prepare_conversations.prepare_conversations`); the plain-text path is
this module's.

Input bytes are read on the driver, so one credential context reads S3 and workers never need AWS
credentials; workers do the CPU-heavy parsing and tokenization. A run with the same fingerprint
(inputs, tokenizer, shard layout) as a complete output does nothing; an interrupted one resumes after
its finished shards (see `writer.Progress`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from moeforge.platform.config.builder import ConfigError, require
from moeforge.platform.data.chat_template import load_chat_template
from moeforge.platform.data.corpus import (
    CorpusError,
    InputFile,
    discover,
    kind_of,
    parse_documents,
    read_input,
)
from moeforge.platform.data.shards import (
    DTYPES,
    FORMAT,
    MANIFEST,
    all_shard_entries,
    check_vocab_fits,
    dtype_for_vocab,
)
from moeforge.platform.data.tokenizer import (
    encode_documents,
    eos_id,
    load_tokenizer,
    tokenizer_hash,
    train_bpe,
)
from moeforge.platform.data.writer import PROGRESS, SPLITS, Progress, SplitWriter
from moeforge.platform.launch.ray_connection import check_ray_address, connect_ray
from moeforge.platform.outputs.storage import MiB, S3Options, Storage, open_storage

TOKENIZER_FILE = "tokenizer.json"
FORMATS = ("text", "conversations")
EXAMPLES = ("sft",)


@dataclass
class PrepareConfig:
    """What to tokenize, with which tokenizer, into what shard layout, where."""

    inputs: list[str] = field(default_factory=lambda: ["stdlib"])  # paths, globs, s3:// URLs, "stdlib"
    output: str = "data/tokens/stdlib"  # local folder or s3://bucket/prefix
    tokenizer: str | None = None  # a tokenizer.json path (local or s3://); None trains byte-level BPE
    vocab_size: int = 4096  # for training (model tiny's vocab)
    tokenizer_train_bytes: int = 32 * MiB  # text fed to BPE training, from the start of the corpus
    dtype: str = "auto"  # auto | uint16 | uint32
    shard_tokens: int = 1 << 20
    val_fraction: float = 0.02  # documents held out for validation, chosen by a seeded hash
    seed: int = 1234
    text_field: str = "text"  # JSONL key / Parquet column holding each document
    extensions: list[str] = field(default_factory=lambda: [".txt", ".md", ".py", ".jsonl", ".parquet"])
    max_files: int | None = None
    max_bytes: int | None = None
    endpoint_url: str | None = None  # S3-compatible endpoint for inputs, tokenizer and output
    batch_files: int = 8  # input files per Ray Data batch
    window_bytes: int = 256 * MiB  # input bytes held by the driver at once
    num_cpus: int | None = None  # CPUs of a local Ray cluster started here (None: all)
    # text: documents into one token stream; conversations: `messages` records rendered with the
    # tokenizer's chat template, packed into rows of seq_len + 1 tokens with loss masks and segments
    format: str = "text"
    seq_len: int | None = None  # conversations: the training seq_len the rows are packed for
    example: str | None = None  # sft: write a self-contained fine-tuning example into `output` instead

    def __post_init__(self) -> None:
        self.inputs = [str(i) for i in ([self.inputs] if isinstance(self.inputs, str) else self.inputs)]
        self.extensions = [str(e) for e in self.extensions]
        require(bool(self.inputs), "inputs", "must name at least one input (path, glob, s3:// URL or stdlib)")
        require(bool(self.output), "output", "must be a local folder or s3://bucket/prefix")
        require(self.dtype in ("auto", *DTYPES), "dtype", f"must be auto, uint16 or uint32, got {self.dtype!r}")
        if self.tokenizer is None:
            require(self.vocab_size > 256, "vocab_size", f"must exceed 256 for byte-level BPE, got {self.vocab_size}")
        if self.dtype != "auto" and self.tokenizer is None:
            limit = int(np.iinfo(DTYPES[self.dtype]).max) + 1
            require(self.vocab_size <= limit, "vocab_size", f"{self.vocab_size} overflows {self.dtype} (max {limit} ids)")
        require(self.shard_tokens >= 1, "shard_tokens", f"must be >= 1, got {self.shard_tokens}")
        require(0.0 <= self.val_fraction < 1.0, "val_fraction", "must lie in [0, 1)")
        require(self.max_files is None or self.max_files >= 1, "max_files", "must be >= 1 or null")
        require(self.max_bytes is None or self.max_bytes >= 1, "max_bytes", "must be >= 1 or null")
        require(self.batch_files >= 1, "batch_files", "must be >= 1")
        require(self.window_bytes >= 1, "window_bytes", "must be >= 1")
        require(self.format in FORMATS, "format", f"must be one of {', '.join(FORMATS)}, got {self.format!r}")
        require(self.example is None or self.example in EXAMPLES, "example",
                f"must be one of {', '.join(EXAMPLES)} or null, got {self.example!r}")
        if self.format == "conversations" and self.example is None:
            require(self.seq_len is not None, "seq_len",
                    "is required with format=conversations (rows are packed to seq_len + 1 tokens here)")
            require(self.tokenizer is not None, "tokenizer", "is required with format=conversations (a "
                    "tokenizer.json with the chat template in the tokenizer_config.json beside it)")
        if self.seq_len is not None:
            require(self.format == "conversations", "seq_len",
                    "only format=conversations packs rows at prepare time (text is cut into windows in training)")
            require(self.seq_len >= 1, "seq_len", f"must be >= 1, got {self.seq_len}")

    def s3(self) -> S3Options:
        return S3Options(endpoint_url=self.endpoint_url)


@dataclass
class PrepareResult:
    output: str
    manifest: dict
    already_complete: bool = False
    shards_written: int = 0
    shards_skipped: int = 0  # finished by an earlier, interrupted run
    tokens: int = 0  # tokens produced by this run's tokenization
    tokenize_s: float = 0.0  # wall time of the Ray Data pipeline (including shard writes)


class PrepareTally:
    """Where a preparation stands, for its one line per finished shard: input files read, tokens
    tokenized and shards written by this run, and the token rate since `start()` (after the Ray
    cluster is up, so start-up is not counted)."""

    def __init__(self, files_done: int, files_total: int, log: Callable[[str], None], on_shard=None) -> None:
        self.files_done, self.files_total = files_done, files_total
        self.log, self.on_shard = log, on_shard
        self.tokens = self.written = 0
        self.started = time.perf_counter()

    def start(self) -> None:
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def file_read(self, index: int, tokens: int) -> None:
        self.files_done, self.tokens = index + 1, self.tokens + tokens

    def shard_written(self, split: str, entry: dict, size: str) -> None:
        """Count the shard, log it (`size`: its rows or tokens, in words) and hand it to `on_shard`."""
        self.written += 1
        rate = self.tokens / max(self.seconds(), 1e-9)
        self.log(f"prepare: {entry['path']} {size} sha256 {entry['sha256'][:12]} | "
                 f"files {self.files_done}/{self.files_total} | {rate:,.0f} tok/s")  # fmt: skip
        if self.on_shard is not None:
            self.on_shard(split, entry)


# --- worker side ---------------------------------------------------------------------------------

_TOKENIZERS: dict[str, object] = {}  # per worker process: tokenizer hash -> Tokenizer


def is_val_document(seed: int, uri: str, index: int, val_fraction: float) -> bool:
    """A seeded, order-independent choice of held-out documents."""
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{uri}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def tokenize_file(uri: str, kind: str, data: bytes, tok, eos: int, cfg: PrepareConfig) -> dict:
    """One file's documents, parsed, split by document and tokenized: the unit of work shared by
    the Ray Data pipeline and the single-process reference."""
    docs = parse_documents(uri, kind, data, cfg.text_field)
    held = [is_val_document(cfg.seed, uri, j, cfg.val_fraction) for j in range(len(docs))]
    out = {}
    for split, docs_of_split in (("train", [d for d, h in zip(docs, held) if not h]),
                                 ("val", [d for d, h in zip(docs, held) if h])):
        out[split], lengths = encode_documents(tok, docs_of_split, eos)
        out[split + "_docs"] = len(lengths)
    return out


def _tokenize_batch(batch: dict, tokenizer_json: str, tokenizer_sha: str, cfg: PrepareConfig) -> dict:
    """Ray Data UDF: a batch of files (index, uri, kind, data) -> their tokens as bytes per split."""
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # this task holds one CPU; no extra threads
    tok = _TOKENIZERS.get(tokenizer_sha)
    if tok is None:
        tok = _TOKENIZERS[tokenizer_sha] = Tokenizer.from_str(tokenizer_json)
    eos = eos_id(tok)
    dtype = np.dtype(DTYPES[resolved_dtype(cfg, tok.get_vocab_size())])
    out = {"index": [], "train": [], "val": [], "counts": [], "error": []}
    for index, uri, kind, data in zip(batch["index"], batch["uri"], batch["kind"], batch["data"]):
        try:
            result, error = tokenize_file(str(uri), str(kind), bytes(data), tok, eos, cfg), ""
        except CorpusError as err:  # bad input travels as data (see map_files)
            empty = np.zeros(0, dtype=np.int64)
            result, error = {"train": empty, "val": empty, "train_docs": 0, "val_docs": 0}, str(err)
        out["error"].append(error)
        out["index"].append(int(index))
        out["train"].append(result["train"].astype(dtype).tobytes())
        out["val"].append(result["val"].astype(dtype).tobytes())
        out["counts"].append([len(result["train"]), len(result["val"]), result["train_docs"], result["val_docs"]])
    return {
        "index": np.array(out["index"], dtype=np.int64),
        "train": np.array(out["train"], dtype=object),
        "val": np.array(out["val"], dtype=object),
        "counts": np.array(out["counts"], dtype=np.int64).reshape(-1, 4),  # [files, 4]
        "error": np.array(out["error"], dtype=object),
    }


# --- driver side ---------------------------------------------------------------------------------


def resolved_dtype(cfg: PrepareConfig, vocab_size: int) -> str:
    dtype = dtype_for_vocab(vocab_size) if cfg.dtype == "auto" else cfg.dtype
    try:
        check_vocab_fits(vocab_size, dtype)
    except ValueError as err:
        raise ConfigError(f"dtype: {err}") from None
    return dtype


def fingerprint(cfg: PrepareConfig, files: list[InputFile], tokenizer_spec: dict, extra: dict | None = None) -> str:
    """Everything that decides the output bytes; equal fingerprints mean an identical output. `extra`:
    what a format other than text adds (seq_len, the chat template's hash)."""
    spec = {
        "format": FORMAT,
        "inputs": [[f.uri, f.size] for f in files],
        "tokenizer": tokenizer_spec,
        "dtype": cfg.dtype,
        "shard_tokens": cfg.shard_tokens,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "text_field": cfg.text_field,
        **(extra or {}),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def training_texts(files: list[InputFile], cfg: PrepareConfig):
    """Documents from the start of the corpus, up to tokenizer_train_bytes of text."""
    budget = cfg.tokenizer_train_bytes
    for f in files:
        for doc in parse_documents(f.uri, f.kind, read_input(f, cfg.s3()), cfg.text_field):
            yield doc[:budget]
            budget -= len(doc)
            if budget <= 0:
                return


def _windows(files: list[InputFile], start: int, window_bytes: int):
    """Consecutive runs of (index, file) holding about window_bytes of input each."""
    window, size = [], 0
    for index in range(start, len(files)):
        window.append((index, files[index]))
        size += files[index].size
        if size >= window_bytes:
            yield window
            window, size = [], 0
    if window:
        yield window


def input_error(err: BaseException) -> BaseException:
    """The CorpusError/ConfigError behind a Ray task failure, if there is one."""
    seen = set()
    todo = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (CorpusError, ConfigError)):
            return type(e)(str(e.args[0]) if e.args else str(e))
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return err


class RaySession:
    """Context manager: Ray for the duration of a run (`ray_connection.connect_ray`: the connected
    session, RAY_ADDRESS's cluster, or a new local one without the dashboard) and shut down after it
    when this session connected; Ray Data set to keep input order, quietly."""

    def __init__(self, num_cpus: int | None) -> None:
        self.num_cpus, self.started = num_cpus, False

    def __enter__(self):
        import ray

        self.started = not ray.is_initialized()
        connect_ray(num_cpus=self.num_cpus, log_to_driver=False, logging_level=logging.WARNING)
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.execution_options.preserve_order = True  # shards follow input order: reproducible
        ctx.enable_progress_bars = False  # one line per shard instead (see prepare())
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        # Its only warning says the progress bars are off, which is the choice made just above.
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        return ray

    def __exit__(self, *exc) -> None:
        if self.started:
            import ray

            ray.shutdown()


def map_files(ray, files, start, cfg, udf: Callable, fn_kwargs: dict, consume: Callable[[dict], None]) -> None:
    """Run `udf` (a Ray Data batch function over columns index, uri, kind, data) over files[start:]
    and call consume(row) with each file's output row (its columns, by name) in input order.

    The udf returns a file's bad input as its `error` column (the CorpusError's message, "" when
    none) rather than raising it: Ray hands the driver a worker exception's traceback as text, its
    type and message lost. The first error in input order is raised here as a CorpusError."""
    for window in _windows(files, start, cfg.window_bytes):
        items = [{"index": i, "uri": f.uri, "kind": f.kind, "data": read_input(f, cfg.s3())} for i, f in window]
        blocks = max(1, min(len(items), int(ray.available_resources().get("CPU", 1)) * 2))
        ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            udf, batch_size=cfg.batch_files, batch_format="numpy", fn_kwargs=fn_kwargs
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for row in range(len(batch["index"])):
                if batch["error"][row]:
                    raise CorpusError(str(batch["error"][row]))
                consume({name: column[row] for name, column in batch.items()})


def tokenize_windows(ray, files, start, tok, cfg, consume: Callable[[int, dict, bytes, bytes], None]) -> None:
    """Run the Ray Data pipeline over files[start:], calling consume(index, counts, train, val) per
    file in input order."""
    fn_kwargs = {"tokenizer_json": tok.to_str(), "tokenizer_sha": tokenizer_hash(tok), "cfg": cfg}

    def each(row: dict) -> None:
        consume(int(row["index"]), [int(c) for c in row["counts"]], bytes(row["train"]), bytes(row["val"]))

    map_files(ray, files, start, cfg, _tokenize_batch, fn_kwargs, each)


def prepare(
    cfg: PrepareConfig,
    log: Callable[[str], None] = print,
    on_shard: Callable[[str, dict], None] | None = None,
) -> PrepareResult:
    """Prepare cfg.output from cfg.inputs (see the module docstring). `on_shard(split, entry)` is
    called after each shard is durably written and recorded."""
    s3 = cfg.s3()
    conversations = cfg.format == "conversations"
    extensions = tuple(e for e in cfg.extensions if not conversations or kind_of(e) != "text")
    files = discover(cfg.inputs, extensions, cfg.max_files, cfg.max_bytes, s3)
    loaded = load_tokenizer(cfg.tokenizer, s3) if cfg.tokenizer else None
    template = load_chat_template(cfg.tokenizer, s3) if conversations else None
    vocab = loaded.get_vocab_size() if loaded else cfg.vocab_size
    dtype = resolved_dtype(cfg, vocab)
    storage = open_storage(cfg.output, s3)
    spec = {"path": cfg.tokenizer, "sha256": tokenizer_hash(loaded)} if loaded else {
        "train_vocab_size": cfg.vocab_size, "train_bytes": cfg.tokenizer_train_bytes}
    extra = {"kind": cfg.format, "seq_len": cfg.seq_len, "chat_template": template.sha256} if conversations else None
    fp = fingerprint(cfg, files, spec, extra)
    total_bytes = sum(f.size for f in files)
    log(f"prepare: {len(files)} input files ({total_bytes / 1e6:.1f} MB) -> {storage.url()}")

    if storage.exists(MANIFEST):
        manifest = json.loads(storage.read_text(MANIFEST))
        if manifest.get("fingerprint") == fp:
            log(f"prepare: {storage.url(MANIFEST)} is complete for these inputs; nothing to do")
            return PrepareResult(storage.url(), manifest, already_complete=True)
        storage.delete(MANIFEST)  # about to rewrite: the output must not look complete meanwhile
    check_ray_address()  # a dead RAY_ADDRESS fails now, not after the tokenizer is trained
    if conversations:
        # Imported here: prepare_conversations imports this module.
        from moeforge.platform.data.prepare_conversations import prepare_conversations

        return prepare_conversations(cfg, files, loaded, template, storage, fp, log, on_shard)

    progress = Progress.load(storage, fp)
    if progress is not None and not (progress.shards_intact(storage) and storage.exists(TOKENIZER_FILE)):
        log("prepare: the earlier run's shards are not all intact; starting afresh")
        progress = None
    if loaded is not None:
        tok = loaded
    elif progress is not None:
        tok = load_tokenizer(storage.url(TOKENIZER_FILE), s3)  # the one the finished shards used
    else:
        started = time.perf_counter()
        tok = train_bpe(training_texts(files, cfg), cfg.vocab_size)
        log(f"prepare: trained byte-level BPE, {tok.get_vocab_size()} ids, in {time.perf_counter() - started:.1f}s")
    dtype = resolved_dtype(cfg, tok.get_vocab_size())
    if progress is None:
        storage.delete(PROGRESS)
        progress = Progress(fp)
    storage.write_text(TOKENIZER_FILE, tok.to_str())
    restart, drop = progress.resume_point()
    skipped = sum(len(progress.shards[s]) for s in SPLITS)
    if skipped:
        log(f"prepare: resuming after {skipped} finished shards, from input file {restart}/{len(files)}")

    tally = PrepareTally(restart, len(files), log, on_shard)

    def shard_done(split: str, entry: dict) -> None:
        progress.save(storage)  # after the shard itself: a recorded shard always exists
        tally.shard_written(split, entry, f"{entry['num_tokens']:,} tokens")

    writers = {s: SplitWriter(storage, s, dtype, cfg.shard_tokens, progress.shards[s], shard_done) for s in SPLITS}
    progress.shards = {s: writers[s].shards for s in SPLITS}  # one list: the writers append, progress saves
    for split in SPLITS:
        writers[split].skip(drop[split])
    np_dtype = np.dtype(DTYPES[dtype])

    def consume(index: int, counts: list[int], train: bytes, val: bytes) -> None:
        if index != len(progress.file_tokens):  # shards must follow input order to be reproducible
            raise RuntimeError(f"Ray Data returned input file {index} out of order")
        progress.file_tokens.append(counts)
        tally.file_read(index, counts[0] + counts[1])
        writers["train"].add(np.frombuffer(train, dtype=np_dtype))
        writers["val"].add(np.frombuffer(val, dtype=np_dtype))

    try:
        with RaySession(cfg.num_cpus) as ray:
            tally.start()  # throughput excludes cluster start-up
            tokenize_windows(ray, files, restart, tok, cfg, consume)
    except Exception as err:  # noqa: BLE001 -- re-raised; Ray wraps input errors raised in workers
        raise input_error(err) from None
    for split in SPLITS:
        writers[split].close()
    tokenize_s = tally.seconds()

    manifest = _manifest(cfg, files, tok, dtype, fp, progress)
    remove_stale_shards(storage, manifest)
    storage.write_text(MANIFEST, json.dumps(manifest, indent=1))  # last: marks the output complete
    storage.delete(PROGRESS)
    tokens = {s: manifest["splits"][s]["num_tokens"] for s in SPLITS}
    log(f"prepare: done: {tokens['train']:,} train + {tokens['val']:,} val tokens in "
        f"{sum(len(manifest['splits'][s]['shards']) for s in SPLITS)} shards, {tally.tokens / max(tokenize_s, 1e-9):,.0f} "
        f"tok/s -> {storage.url(MANIFEST)}")
    note_empty_val(cfg, manifest, log)
    return PrepareResult(storage.url(), manifest, False, tally.written, skipped, tally.tokens, tokenize_s)


def note_empty_val(cfg: PrepareConfig, manifest: dict, log: Callable[[str], None]) -> None:
    """One note when val_fraction > 0 held out no document: a run on these tokens would otherwise
    skip evaluation without a word."""
    if cfg.val_fraction > 0 and manifest["splits"]["val"]["num_tokens"] == 0:
        log(f"prepare: note: val_fraction={cfg.val_fraction} held out no document ({manifest['splits']['train']['num_docs']} "
            "in all): a run on these tokens has no validation split (raise val_fraction, or give more documents)")


def _manifest(cfg: PrepareConfig, files, tok, dtype: str, fp: str, progress: Progress) -> dict:
    counts = np.array(progress.file_tokens, dtype=np.int64).reshape(-1, 4)  # [files, 4]
    splits = {}
    for col, split in enumerate(SPLITS):
        shards = progress.shards[split]
        splits[split] = {
            "num_tokens": sum(s["num_tokens"] for s in shards),
            "num_docs": int(counts[:, col + 2].sum()),
            "shards": shards,
        }
        if splits[split]["num_tokens"] != int(counts[:, col].sum()):
            raise RuntimeError(f"{split}: shards hold {splits[split]['num_tokens']} tokens, files gave {counts[:, col].sum()}")
    return {
        "format": FORMAT,
        "fingerprint": fp,
        "dtype": dtype,
        "shard_tokens": cfg.shard_tokens,
        "vocab_size": tok.get_vocab_size(),
        "eos_id": eos_id(tok),
        "tokenizer": {"path": TOKENIZER_FILE, "sha256": tokenizer_hash(tok), "source": cfg.tokenizer or "trained"},
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "sources": [{"uri": f.uri, "kind": f.kind, "bytes": f.size} for f in files],
        "splits": splits,
    }


def remove_stale_shards(storage: Storage, manifest: dict) -> None:
    """Delete shard files an earlier, different run left behind (not listed in this manifest)."""
    listed = {s["path"] for s in all_shard_entries(manifest)}
    for split in SPLITS:
        for name in storage.list(split):
            if name.endswith(".bin") and name not in listed:
                storage.delete(name)
