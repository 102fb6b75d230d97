"""One small storage interface for a local directory or an `s3://bucket/prefix`.

`open_storage(root)` returns a `Storage` whose methods take paths relative to the root: read/write
bytes, list, exists, upload/download files. On S3 it uses boto3 with multipart transfers
(`TransferConfig`), retries and timeouts (`botocore.config.Config`), and the endpoint and credentials
of the standard AWS environment (AWS_* variables, profiles, instance roles); `S3Options.endpoint_url`
overrides the endpoint for S3-compatible stores.

Atomicity: a single write is all-or-nothing from a reader's view (locally a temp file renamed into
place; on S3 an object or a completed multipart upload appears whole). A multi-file output is made
complete by writing its marker (a manifest) last, after everything it lists.

Credentials never leave boto3: no message here contains them, and `redact()` strips secret-looking
keys from a config before it is logged, written to disk or sent to W&B.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

MiB = 1 << 20


class StorageError(RuntimeError):
    """Storage is unreachable or misconfigured; the message says which root and why, never secrets."""


@dataclass
class S3Options:
    """How to talk to S3. Unset `endpoint_url` means the AWS default (or AWS_ENDPOINT_URL)."""

    endpoint_url: str | None = None
    max_attempts: int = 5  # total attempts per request, standard retry mode (backoff with jitter)
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    multipart_threshold: int = 64 * MiB
    multipart_chunksize: int = 16 * MiB  # S3 requires >= 5 MiB for every part but the last
    max_concurrency: int = 4


def is_s3(path: str) -> bool:
    return str(path).startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b")."""
    if not is_s3(url):
        raise ValueError(f"{url}: not an s3:// URL")
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"{url}: no bucket name")
    return bucket, key.strip("/")


def join(root: str, *parts: str) -> str:
    """Join path parts with '/', for local paths and s3:// URLs alike."""
    out = str(root).rstrip("/")
    for part in parts:
        if part:
            out = f"{out}/{str(part).strip('/')}"
    return out


class Storage(ABC):
    """Files under one root. Relative paths use '/'."""

    def __init__(self, root: str) -> None:
        self.root = str(root).rstrip("/")

    def url(self, rel: str = "") -> str:
        """The full path or URL of `rel`, as shown in messages."""
        return join(self.root, rel)

    @abstractmethod
    def read_bytes(self, rel: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write atomically: a reader sees the old object (or none) or all of the new one."""

    @abstractmethod
    def exists(self, rel: str) -> bool: ...

    @abstractmethod
    def size(self, rel: str) -> int | None:
        """Size in bytes, or None when there is no such file."""

    @abstractmethod
    def list(self, rel: str = "") -> list[str]:
        """Every file under `rel`, recursively, as sorted paths relative to the root."""

    @abstractmethod
    def upload(self, local_path: str, rel: str) -> None: ...

    @abstractmethod
    def download(self, rel: str, local_path: str) -> None:
        """Copy to a local file atomically (temp file, then rename), creating parent folders."""

    @abstractmethod
    def delete(self, rel: str) -> None:
        """Remove one file; a missing file is not an error."""

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))


def _process_umask() -> int:
    """The process's umask, read without changing it (os.umask can only be read by setting it,
    which would race with files other threads create)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc (not Linux): read it by setting it back at once
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode any program's new file gets (0o666 less the umask). mkstemp's and safetensors'
    owner-only 0600 would keep exported weights and run records from other users and servers."""
    return 0o666 & ~_process_umask()


def _atomic_local_write(path: str, write) -> None:
    """Run `write(tmp_path)` on a temp file beside `path`, then rename it into place, with the
    permissions the umask gives a new file (`file_mode`)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path) + "-")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class LocalStorage(Storage):
    def _path(self, rel: str) -> str:
        return os.path.join(self.root, *[p for p in rel.split("/") if p])

    def read_bytes(self, rel: str) -> bytes:
        with open(self._path(rel), "rb") as f:
            return f.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)

        _atomic_local_write(self._path(rel), write)

    def exists(self, rel: str) -> bool:
        return os.path.exists(self._path(rel))

    def size(self, rel: str) -> int | None:
        path = self._path(rel)
        return os.path.getsize(path) if os.path.isfile(path) else None

    def list(self, rel: str = "") -> list[str]:
        base = self._path(rel)
        if os.path.isfile(base):
            return [rel]
        out = []
        for folder, _, files in os.walk(base):
            for name in files:
                if not name.startswith(".tmp-"):
                    out.append(os.path.relpath(os.path.join(folder, name), self.root).replace(os.sep, "/"))
        return sorted(out)

    def upload(self, local_path: str, rel: str) -> None:
        import shutil

        _atomic_local_write(self._path(rel), lambda tmp: shutil.copyfile(local_path, tmp))

    def download(self, rel: str, local_path: str) -> None:
        import shutil

        source = self._path(rel)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"{source}: not found")
        _atomic_local_write(local_path, lambda tmp: shutil.copyfile(source, tmp))

    def delete(self, rel: str) -> None:
        try:
            os.unlink(self._path(rel))
        except FileNotFoundError:
            pass


class S3Storage(Storage):
    """Objects under `s3://bucket/prefix`; construct with `open_storage` (which checks access)."""

    def __init__(self, root: str, options: S3Options | None = None) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        super().__init__(root)
        for name in ("boto3", "botocore", "s3transfer", "urllib3"):  # their DEBUG/INFO lines name
            logger = logging.getLogger(name)  # credential sources and request headers
            logger.setLevel(max(logger.level, logging.WARNING))
        self.options = options or S3Options()
        self.bucket, self.prefix = split_s3(self.root)
        self.session = boto3.session.Session()
        opts = self.options
        config = Config(
            retries={"total_max_attempts": opts.max_attempts, "mode": "standard"},
            connect_timeout=opts.connect_timeout,
            read_timeout=opts.read_timeout,
        )
        self.client = self.session.client("s3", endpoint_url=opts.endpoint_url, config=config)
        self.transfer = TransferConfig(
            multipart_threshold=opts.multipart_threshold,
            multipart_chunksize=opts.multipart_chunksize,
            max_concurrency=opts.max_concurrency,
        )

    def _key(self, rel: str) -> str:
        return "/".join(p for p in (self.prefix, rel.strip("/")) if p)

    def endpoint(self) -> str:
        return self.client.meta.endpoint_url

    def check(self) -> None:
        """Fail fast, with one clear message, when credentials are missing, the endpoint is
        unreachable or the bucket is absent: one quick HeadBucket with a short timeout."""
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        where = f"s3://{self.bucket} (endpoint {self.endpoint()})"
        if self.session.get_credentials() is None:
            raise StorageError(
                f"{where}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE or an instance role)"
            )
        quick = Config(retries={"total_max_attempts": 2, "mode": "standard"}, connect_timeout=2, read_timeout=10)
        client = self.session.client("s3", endpoint_url=self.options.endpoint_url, config=quick)
        try:
            client.head_bucket(Bucket=self.bucket)
        except NoCredentialsError:
            raise StorageError(f"{where}: no AWS credentials found") from None
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(f"{where}: bucket does not exist") from None
            if code in ("403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StorageError(f"{where}: access denied (check the credentials) [{code}]") from None
            raise StorageError(f"{where}: {code or err}") from None
        except BotoCoreError as err:
            raise StorageError(f"{where}: cannot reach the endpoint ({type(err).__name__})") from None

    def _not_found(self, err, rel: str) -> Exception:
        """FileNotFoundError naming the URL for a botocore ClientError meaning 'no such key'."""
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            return FileNotFoundError(f"{self.url(rel)}: not found")
        return err

    def read_bytes(self, rel: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"].read()
        except ClientError as err:
            raise self._not_found(err, rel) from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        # One PUT (or a multipart upload above the threshold) is atomic: readers see the previous
        # object or the complete new one, never a prefix.
        self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(rel), Config=self.transfer)

    def size(self, rel: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(rel))["ContentLength"])
        except ClientError as err:
            if isinstance(self._not_found(err, rel), FileNotFoundError):
                return None
            raise

    def exists(self, rel: str) -> bool:
        return self.size(rel) is not None

    def list(self, rel: str = "") -> list[str]:
        prefix = self._key(rel)
        if prefix:
            prefix += "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return sorted(out)

    def upload(self, local_path: str, rel: str) -> None:
        # Multipart above the threshold; the object appears only when the upload completes.
        self.client.upload_file(local_path, self.bucket, self._key(rel), Config=self.transfer)

    def download(self, rel: str, local_path: str) -> None:
        from botocore.exceptions import ClientError

        def fetch(tmp: str) -> None:
            try:
                self.client.download_file(self.bucket, self._key(rel), tmp, Config=self.transfer)
            except ClientError as err:
                raise self._not_found(err, rel) from None

        _atomic_local_write(local_path, fetch)

    def delete(self, rel: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(rel))


def open_storage(root: str, options: S3Options | None = None, check: bool = True) -> Storage:
    """A `Storage` for a local directory or an s3:// URL. For S3, `check` first verifies
    credentials, endpoint and bucket, failing fast with one `StorageError` message."""
    if is_s3(root):
        storage = S3Storage(root, options)
        if check:
            storage.check()
        return storage
    return LocalStorage(root)


def check_local_output(path: str, field: str, *, directory: bool) -> None:
    """Refuse, before any work, a local output location that cannot be written: `path` (a
    directory when `directory`, else a file) must be, or be creatable as, that kind, under a
    writable directory. Raises ConfigError naming `field`. An s3:// URL is checked where its
    storage is opened (`S3Storage.check`), so it passes here."""
    from moeforge.platform.config.builder import ConfigError

    if is_s3(path):
        return
    target = os.path.abspath(path)
    if os.path.exists(target):
        if directory and not os.path.isdir(target):
            raise ConfigError(f"{field}: {path} is a file, not a directory")
        if not directory and os.path.isdir(target):
            raise ConfigError(f"{field}: {path} is a directory; give a file name")
        writable = target if directory else os.path.dirname(target)
        if not os.access(writable, os.W_OK | os.X_OK):
            raise ConfigError(f"{field}: {writable} is not writable")
        return
    parent = os.path.dirname(target)
    while not os.path.exists(parent):  # the nearest existing ancestor must be a writable directory
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"{field}: {path} cannot be created: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{field}: {path} cannot be created: {parent} is not writable")


def write_text_file(path: str, text: str) -> None:
    """Write one text file at a local path or s3:// URL (atomically), e.g. a benchmark's JSON report."""
    parent, _, name = str(path).rstrip("/").rpartition("/")
    open_storage(parent or ".").write_text(name, text)


# --- redaction -------------------------------------------------------------------------------------

_SECRET_WORDS = {"secret", "password", "passwd", "credential", "credentials", "apikey", "auth", "authorization"}
_SECRET_PAIRS = ("api_key", "access_key", "private_key", "secret_key", "session_token")
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)
REDACTED = "<redacted>"


def is_secret_key(key: str) -> bool:
    """Whether a config key looks like it holds a secret (password, api_key, aws_secret_access_key,
    hf_token, ...). Names like `eos_token_id` or `vocab_size` are not secrets."""
    name = str(key).lower()
    words = [w for w in re.split(r"[^a-z0-9]+", name) if w]
    if any(w in _SECRET_WORDS for w in words) or any(pair in name for pair in _SECRET_PAIRS):
        return True
    return bool(words) and words[-1] in ("token", "key")  # hf_token, wandb_key; not token_count


def redact(config: Any) -> Any:
    """A copy of a config (nested dicts/lists) with secret-looking keys' values replaced by
    '<redacted>' and `user:password@` stripped from URLs."""
    if isinstance(config, dict):
        return {k: (REDACTED if is_secret_key(k) and v is not None else redact(v)) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return type(config)(redact(v) for v in config)
    if isinstance(config, str):
        return _URL_USERINFO.sub(r"\g<scheme>", config)
    return config
