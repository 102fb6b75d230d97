"""Storage against the local filesystem and a real S3 API (moto's server on 127.0.0.1)."""

from __future__ import annotations

import os
import uuid

import boto3
import pytest
from botocore.exceptions import ConnectionClosedError
from moeforge.platform.outputs.storage import (
    REDACTED,
    MiB,
    S3Options,
    StorageError,
    join,
    open_storage,
    redact,
)

from tests.conftest import free_port


@pytest.fixture
def bucket(s3_server):
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


def _round_trip(storage, tmp_path):
    storage.write_bytes("a/one.bin", b"\x00\x01payload")
    storage.write_text("a/b/two.txt", "hello")
    storage.write_text("three.json", "{}")
    assert storage.read_bytes("a/one.bin") == b"\x00\x01payload"
    assert storage.read_text("a/b/two.txt") == "hello"
    assert storage.exists("a/one.bin") and not storage.exists("a/missing")
    assert storage.size("a/one.bin") == 9 and storage.size("a/missing") is None
    assert storage.list() == ["a/b/two.txt", "a/one.bin", "three.json"]
    assert storage.list("a") == ["a/b/two.txt", "a/one.bin"]
    local = tmp_path / "upload.bin"
    local.write_bytes(os.urandom(1000))
    storage.upload(str(local), "up/file.bin")
    storage.download("up/file.bin", str(tmp_path / "down" / "file.bin"))
    assert (tmp_path / "down" / "file.bin").read_bytes() == local.read_bytes()
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        storage.read_bytes("nope.bin")
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        storage.download("nope.bin", str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    storage.delete("three.json")
    assert not storage.exists("three.json")


def test_local_round_trip_leaves_no_temp_files(tmp_path):
    storage = open_storage(str(tmp_path / "root"))
    _round_trip(storage, tmp_path)
    names = [n for _, _, files in os.walk(tmp_path) for n in files]
    assert not [n for n in names if n.startswith(".tmp-")]


def test_s3_round_trip_and_list(s3_server, bucket, tmp_path):
    storage = open_storage(f"s3://{bucket}/some/prefix", S3Options(endpoint_url=s3_server))
    _round_trip(storage, tmp_path)
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=bucket)["Contents"]]
    assert all(k.startswith("some/prefix/") for k in keys)
    assert join(f"s3://{bucket}/p/", "/x/", "y") == f"s3://{bucket}/p/x/y"


def _multipart_storage(s3_server, bucket, **kw):
    opts = S3Options(endpoint_url=s3_server, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, **kw)
    return open_storage(f"s3://{bucket}/mp", opts)


def test_s3_multipart_upload_of_11_mib(s3_server, bucket, tmp_path):
    payload = os.urandom(11 * MiB)
    (tmp_path / "big.bin").write_bytes(payload)
    storage = _multipart_storage(s3_server, bucket)
    parts = []
    storage.client.meta.events.register("before-send.s3.UploadPart", lambda request, **_: parts.append(1))
    storage.upload(str(tmp_path / "big.bin"), "big.bin")
    etag = boto3.client("s3", endpoint_url=s3_server).head_object(Bucket=bucket, Key="mp/big.bin")["ETag"]
    assert etag.strip('"').endswith("-3") and len(parts) == 3  # 5 + 5 + 1 MiB parts
    storage.download("big.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == payload


def _fail_first_part_once(storage):
    """A real connection failure on the wire for the first UploadPart request, once."""
    calls = []

    def drop_connection(request, **_):
        calls.append(request.url)
        if len(calls) == 1:
            raise ConnectionClosedError(endpoint_url=request.url)

    storage.client.meta.events.register("before-send.s3.UploadPart", drop_connection)
    return calls


def test_s3_interrupted_part_is_retried(s3_server, bucket, tmp_path):
    payload = os.urandom(11 * MiB)
    (tmp_path / "big.bin").write_bytes(payload)
    storage = _multipart_storage(s3_server, bucket, max_concurrency=1)
    calls = _fail_first_part_once(storage)
    storage.upload(str(tmp_path / "big.bin"), "retried.bin")
    assert len(calls) == 4 and calls[0] == calls[1]  # the dropped part went again, then two more
    assert storage.read_bytes("retried.bin") == payload

    no_retry = _multipart_storage(s3_server, bucket, max_concurrency=1, max_attempts=1)
    _fail_first_part_once(no_retry)
    with pytest.raises(Exception, match="Connection was closed"):
        no_retry.upload(str(tmp_path / "big.bin"), "not-retried.bin")
    assert not no_retry.exists("not-retried.bin")  # an aborted multipart upload is never visible


def test_s3_bad_endpoint_missing_bucket_and_missing_credentials_fail_fast(s3_server, bucket, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StorageError, match=r"s3://b \(endpoint http://127.0.0.1:\d+\): cannot reach the endpoint"):
        open_storage("s3://b/x", S3Options(endpoint_url=dead))
    with pytest.raises(StorageError, match="s3://no-such-bucket .*bucket does not exist"):
        open_storage("s3://no-such-bucket/x", S3Options(endpoint_url=s3_server))
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError, match="no AWS credentials found") as err:
        open_storage(f"s3://{bucket}/x", S3Options(endpoint_url=s3_server))
    assert "testing-secret" not in str(err.value)


def test_redact_strips_secret_looking_keys_and_url_passwords():
    config = {
        "model": {"vocab_size": 4096, "eos_token_id": 1, "num_tokens": 5},
        "storage": {"aws_secret_access_key": "S3CRET", "AWS_ACCESS_KEY_ID": "AKIA", "endpoint_url": "http://h:9000"},
        "tracking": {"wandb_api_key": "k", "hf_token": "t", "password": "p", "project": "moeforge"},
        "urls": ["https://user:pw@example.com/x", "s3://bucket/prefix"],
        "maybe": {"secret": None},
    }
    out = redact(config)
    assert out["model"] == config["model"]
    assert out["storage"] == {"aws_secret_access_key": REDACTED, "AWS_ACCESS_KEY_ID": REDACTED,
                              "endpoint_url": "http://h:9000"}
    assert out["tracking"] == {"wandb_api_key": REDACTED, "hf_token": REDACTED, "password": REDACTED,
                               "project": "moeforge"}
    assert out["urls"] == ["https://example.com/x", "s3://bucket/prefix"]
    assert out["maybe"] == {"secret": None}
    assert config["storage"]["aws_secret_access_key"] == "S3CRET"  # the input is not modified
