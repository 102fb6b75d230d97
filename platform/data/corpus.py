"""Input discovery and parsing for `moeforge-prepare`.

Inputs are local files, directories, glob patterns, `s3://bucket/prefix` URLs, or the word `stdlib`:
the running interpreter's own standard-library `.py` sources (no download). Each file is one of three
kinds, chosen by extension: plain text (one document per file), JSONL (one document per line, from a
string field, `text` by default) or Parquet (one document per row of that column).

Discovery runs on the driver before any work and fails with one message naming the path; the bytes
are read on the driver too (one credential context, see `prepare.map_files`) and parsed where they are
tokenized.
"""

from __future__ import annotations

import glob
import io
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass

from moeforge.platform.outputs.storage import S3Options, is_s3, open_storage

KINDS = ("text", "jsonl", "parquet")
# Standard-library folders that are not representative source (tests hold deliberately odd files).
_STDLIB_SKIP = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib", "lib2to3"}


class CorpusError(ValueError):
    """Bad input: a missing, unreadable, empty or malformed file, named in the message."""


@dataclass(frozen=True)
class InputFile:
    uri: str  # local path or s3:// URL
    kind: str  # text | jsonl | parquet
    size: int  # bytes


def kind_of(path: str) -> str:
    name = path.lower()
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def stdlib_files() -> list[str]:
    """The interpreter's standard-library .py sources, sorted, tests and vendored packages left out."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP)
        out.extend(os.path.join(folder, f) for f in files if f.endswith(".py"))
    return sorted(out)


def _local_file(path: str, named: bool) -> InputFile | None:
    """A readable local file; an explicitly named empty or unreadable file is an error, an empty
    file found by walking a folder is skipped (the stdlib has many empty __init__.py)."""
    if not os.access(path, os.R_OK):
        raise CorpusError(f"{path}: not readable")
    size = os.path.getsize(path)
    if size == 0:
        if named:
            raise CorpusError(f"{path}: empty file")
        return None
    return InputFile(path, kind_of(path), size)


def _walk(folder: str, extensions: tuple[str, ...]) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(os.path.join(root, f) for f in files if f.lower().endswith(extensions))
    return sorted(out)


def _s3_files(url: str, extensions: tuple[str, ...], options: S3Options | None) -> list[InputFile]:
    storage = open_storage(url, options)
    names = storage.list()
    if not names:  # perhaps the URL names one object rather than a prefix
        parent, _, name = url.rpartition("/")
        parent_storage = open_storage(parent, options, check=False)
        if parent_storage.exists(name):
            return [InputFile(url, kind_of(url), parent_storage.size(name))]
        raise CorpusError(f"{url}: no objects at this S3 prefix")
    out = []
    for name in names:
        if name.lower().endswith(extensions):
            size = storage.size(name)
            if size:
                out.append(InputFile(storage.url(name), kind_of(name), size))
    return out


def discover(
    inputs: list[str],
    extensions: tuple[str, ...] = (".txt", ".md", ".py", ".jsonl", ".parquet"),
    max_files: int | None = None,
    max_bytes: int | None = None,
    s3: S3Options | None = None,
) -> list[InputFile]:
    """Every input file in a stable order, cut to `max_files` files and about `max_bytes` bytes
    (whole files; at least one). Fails naming the first path that is missing or unusable."""
    extensions = tuple(e.lower() for e in extensions)
    found: list[InputFile] = []
    for item in inputs:
        item = str(item)
        if item == "stdlib":
            found.extend(f for f in (_local_file(p, named=False) for p in stdlib_files()) if f)
        elif is_s3(item):
            found.extend(_s3_files(item.rstrip("/"), extensions, s3))
        elif any(ch in item for ch in "*?["):
            paths = sorted(glob.glob(item, recursive=True))
            if not paths:
                raise CorpusError(f"{item}: no files match this pattern")
            found.extend(f for f in (_local_file(p, named=False) for p in paths if os.path.isfile(p)) if f)
        elif os.path.isdir(item):
            found.extend(f for f in (_local_file(p, named=False) for p in _walk(item, extensions)) if f)
        elif os.path.isfile(item):
            found.append(_local_file(item, named=True))
        else:
            raise CorpusError(f"{item}: input path does not exist")
    if not found:
        raise CorpusError(f"{', '.join(map(str, inputs))}: no non-empty input files found")
    chosen, total = [], 0
    for f in found:
        if max_files is not None and len(chosen) >= max_files:
            break
        if max_bytes is not None and chosen and total + f.size > max_bytes:
            break
        chosen.append(f)
        total += f.size
    return chosen


def read_input(f: InputFile, s3: S3Options | None = None) -> bytes:
    """The raw bytes of one input file (local or S3)."""
    if is_s3(f.uri):
        parent, _, name = f.uri.rpartition("/")
        return open_storage(parent, s3, check=False).read_bytes(name)
    try:
        with open(f.uri, "rb") as fh:
            return fh.read()
    except OSError as err:
        raise CorpusError(f"{f.uri}: cannot read ({err.strerror})") from None


def jsonl_records(uri: str, data: bytes) -> Iterator[tuple[int, object]]:
    """(line number from 1, parsed record) of each non-blank line of a JSONL file's bytes."""
    for lineno, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{uri}:{lineno}: not valid JSON ({err.msg})") from None


def parquet_column(uri: str, data: bytes, field: str) -> list:
    """The values of column `field` of a Parquet file's bytes, in row order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as err:
        raise CorpusError(f"{uri}: not a readable Parquet file ({err})") from None
    if field not in table.column_names:
        raise CorpusError(f"{uri}: no column {field!r} (columns: {', '.join(table.column_names)})")
    return table.column(field).to_pylist()


def parse_documents(uri: str, kind: str, data: bytes, text_field: str = "text") -> list[str]:
    """The non-empty documents of one file's bytes."""
    if kind == "text":
        docs = [data.decode("utf-8", errors="replace")]
    elif kind == "jsonl":
        docs = []
        for lineno, record in jsonl_records(uri, data):
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise CorpusError(f"{uri}:{lineno}: no string field {text_field!r}")
            docs.append(text)
    elif kind == "parquet":
        docs = [t for t in parquet_column(uri, data, text_field) if isinstance(t, str)]
    else:
        raise CorpusError(f"{uri}: unknown input kind {kind!r} (one of {KINDS})")
    return [d for d in docs if d.strip()]
