"""moeforge-prepare on a real local Ray cluster (and moto's S3 server): shards equal a single-process
tokenization, an interrupted run resumes after its finished shards, a complete one is skipped, S3
round trip, corrupt shards are named, bad input fails with one line."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import uuid

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from moeforge.platform.config.builder import ConfigError
from moeforge.platform.config.data import DataConfig
from moeforge.platform.data import BatchSource
from moeforge.platform.data.corpus import CorpusError, InputFile, read_input
from moeforge.platform.data.prepare import PrepareConfig, prepare, tokenize_file
from moeforge.platform.data.shards import MANIFEST, ShardError, TokenStream, sha256_file
from moeforge.platform.data.tokenizer import eos_id, load_tokenizer
from moeforge.platform.outputs.storage import StorageError

from tests.conftest import free_port

SHARD = 20_000


class Interrupted(Exception):
    pass


def _config(output, **kw) -> PrepareConfig:
    base = {"inputs": ["stdlib"], "output": str(output), "max_files": 12, "vocab_size": 512,
            "shard_tokens": SHARD, "val_fraction": 0.25, "seed": 7, "batch_files": 2}
    return PrepareConfig(**{**base, **kw})


def interrupt_after_two_shards(cfg: PrepareConfig, out) -> list[str]:
    """Run `prepare` until it has written two shards, then stop it as a crash would; return the
    two shards' paths. A half-written output is never marked complete."""
    written = []

    def stop_after_two(split, entry):
        written.append(entry["path"])
        if len(written) == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        prepare(cfg, log=lambda _: None, on_shard=stop_after_two)
    assert not (out / MANIFEST).exists()
    return written


@pytest.fixture(scope="module")
def prepared(ray_cluster, tmp_path_factory):
    """One corpus, prepared in two goes: interrupted after two shards, then resumed."""
    out = tmp_path_factory.mktemp("tokens") / "stdlib"
    cfg = _config(out)
    written = interrupt_after_two_shards(cfg, out)
    first_two = {p: os.stat(out / p).st_mtime_ns for p in written}
    resumed = prepare(cfg, log=lambda _: None)
    return {"cfg": cfg, "out": out, "result": resumed, "first_two": first_two}


def _reference_streams(manifest: dict, tok, cfg: PrepareConfig) -> dict[str, np.ndarray]:
    """The same files tokenized in this process, one file after another."""
    parts = {"train": [], "val": []}
    for src in manifest["sources"]:
        f = InputFile(src["uri"], src["kind"], src["bytes"])
        out = tokenize_file(f.uri, f.kind, read_input(f), tok, eos_id(tok), cfg)
        parts["train"].append(out["train"])
        parts["val"].append(out["val"])
    return {s: np.concatenate(p) for s, p in parts.items()}


def test_shards_equal_single_process_tokenization(prepared):
    out, cfg = prepared["out"], prepared["cfg"]
    manifest = json.loads((out / MANIFEST).read_text())
    tok = load_tokenizer(str(out / "tokenizer.json"))
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 512 == tok.get_vocab_size()
    assert len(manifest["sources"]) == 12 and manifest["shard_tokens"] == SHARD
    reference = _reference_streams(manifest, tok, cfg)
    for split in ("train", "val"):
        info = manifest["splits"][split]
        assert info["num_tokens"] == len(reference[split]) > 0
        assert all(s["num_tokens"] == SHARD for s in info["shards"][:-1])
        for shard in info["shards"]:
            assert sha256_file(str(out / shard["path"])) == shard["sha256"]
        stream = TokenStream.from_prepared(str(out), split)
        assert np.array_equal(stream.read(0, stream.num_tokens), reference[split])
    assert manifest["splits"]["train"]["num_docs"] + manifest["splits"]["val"]["num_docs"] == 12


def test_interrupted_run_resumed_after_its_finished_shards(prepared, tmp_path):
    result = prepared["result"]
    assert result.shards_skipped == 2 and result.shards_written >= 1
    for path, mtime in prepared["first_two"].items():  # finished shards were not written again
        assert os.stat(prepared["out"] / path).st_mtime_ns == mtime
    assert not (prepared["out"] / "_progress.json").exists()
    fresh = prepare(_config(tmp_path / "fresh"), log=lambda _: None)
    assert fresh.manifest["splits"] == result.manifest["splits"]  # same bytes as one uninterrupted run


def test_rerun_of_a_complete_output_does_nothing(prepared):
    lines = []
    again = prepare(prepared["cfg"], log=lines.append)
    assert again.already_complete and again.shards_written == 0
    assert any("nothing to do" in line for line in lines)


def test_a_split_that_holds_out_nothing_is_named_once(ray_cluster, tmp_path):
    """val_fraction > 0 that happens to hold out no document gets one note naming the setting:
    a run on these tokens would otherwise skip evaluation without a word."""
    lines = []
    result = prepare(_config(tmp_path / "no_val", max_files=2, val_fraction=1e-9), log=lines.append)
    assert result.manifest["splits"]["val"]["num_tokens"] == 0
    notes = [line for line in lines if "note:" in line]
    assert len(notes) == 1 and "val_fraction=1e-09 held out no document" in notes[0], lines


def test_batch_source_reads_prepared_shards(prepared):
    out = str(prepared["out"])
    cfg = DataConfig(source="tokens", path=out, global_batch=4, seed=3)
    src = BatchSource(cfg, 512, 16)
    train = TokenStream.from_prepared(out, "train")
    assert src.num_samples == (train.num_tokens - 1) // 16 and src.has_val
    windows = {tuple(train.read(i * 16, 17)) for i in range(src.num_samples)}
    assert all(tuple(row) in windows for row in src.batch(5).tolist())
    val = TokenStream.from_prepared(out, "val")
    assert np.array_equal(src.val_batch(0)[0].numpy(), val.read(0, 17))
    assert torch.equal(src.batch(5), BatchSource(cfg, 512, 16).batch(5))
    with pytest.raises(ConfigError, match="vocab_size 512, larger than the model's 256"):
        BatchSource(cfg, 256, 16)


def test_corrupt_truncated_and_missing_shards_are_named(prepared, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(prepared["out"], copy)
    cfg = DataConfig(source="tokens", path=str(copy), global_batch=2)
    shard = copy / "train" / "00001.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train/00001.bin: sha256 mismatch"):
        BatchSource(cfg, 512, 16)
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(ShardError, match=r"train/00001.bin: size \d+ bytes, manifest says \d+"):
        BatchSource(cfg, 512, 16)
    shard.unlink()
    with pytest.raises(ShardError, match=r"train/00001.bin: shard listed in the manifest is missing"):
        BatchSource(cfg, 512, 16)


def _jsonl_and_parquet(docs: list[str]) -> tuple[bytes, bytes]:
    jsonl = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[:3])).encode()
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": docs[3:], "n": list(range(len(docs) - 3))}), buf)
    return jsonl, buf.getvalue()


def test_prepare_from_s3_jsonl_and_parquet_to_s3_and_read_back(prepared, s3_server, tmp_path):
    bucket = f"prep-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=bucket)
    docs = [f"def f{i}(x):\n    return x * {i}\n" * (i + 2) for i in range(7)]
    jsonl, parquet = _jsonl_and_parquet(docs)
    client.put_object(Bucket=bucket, Key="corpus/a.jsonl", Body=jsonl)
    client.put_object(Bucket=bucket, Key="corpus/b.parquet", Body=parquet)
    tokenizer = str(prepared["out"] / "tokenizer.json")
    cfg = PrepareConfig(inputs=[f"s3://{bucket}/corpus"], output=f"s3://{bucket}/tokens", tokenizer=tokenizer,
                        shard_tokens=64, val_fraction=0.0, endpoint_url=s3_server)
    result = prepare(cfg, log=lambda _: None)
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="tokens/")["Contents"]}
    assert {"tokens/manifest.json", "tokens/tokenizer.json", "tokens/train/00000.bin"} <= keys
    assert result.manifest["splits"]["train"]["num_docs"] == 7

    tok = load_tokenizer(tokenizer)
    expected = np.concatenate([np.append(tok.encode(d, add_special_tokens=False).ids, eos_id(tok)) for d in docs])
    data_cfg = DataConfig(source="tokens", path=f"s3://{bucket}/tokens", global_batch=2, val_fraction=0.2,
                          cache_dir=str(tmp_path / "cache"), endpoint_url=s3_server)
    src = BatchSource(data_cfg, 512, 8)
    local = tmp_path / "cache" / bucket / "tokens"
    assert (local / MANIFEST).exists()
    stream = TokenStream.from_prepared(str(local), "train")
    assert np.array_equal(stream.read(0, stream.num_tokens), expected)
    assert src.batch(0).shape == (2, 9)
    again = prepare(cfg, log=lambda _: None)
    assert again.already_complete


def test_vocab_overflowing_the_dtype_is_refused_before_any_output(prepared, tmp_path):
    from tokenizers import Tokenizer, models

    big = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(70_000)}, unk_token="w0"))
    big.save(str(tmp_path / "big.json"))
    cfg = _config(tmp_path / "out", tokenizer=str(tmp_path / "big.json"), dtype="uint16")
    with pytest.raises(ConfigError, match="dtype: vocab_size 70000 overflows uint16"):
        prepare(cfg, log=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_bad_inputs_fail_fast_naming_the_path(tmp_path, s3_server):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CorpusError, match="nope: input path does not exist"):
        prepare(_config(tmp_path / "o", inputs=[str(tmp_path / "nope")]))
    with pytest.raises(CorpusError, match="empty.txt: empty file"):
        prepare(_config(tmp_path / "o", inputs=[str(tmp_path / "empty.txt")]))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: no string field 'text'"):
        prepare(_config(tmp_path / "o", inputs=[str(tmp_path / "bad.jsonl")], vocab_size=300))
    with pytest.raises(StorageError, match="cannot reach the endpoint"):
        prepare(_config(f"s3://b/{uuid.uuid4().hex}", endpoint_url=f"http://127.0.0.1:{free_port()}"))
    assert not (tmp_path / "o" / MANIFEST).exists()


def test_cli_exits_2_with_one_stderr_line(tmp_path):
    env = dict(os.environ, AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="do-not-print-me")
    cases = [
        ([f"inputs=[{tmp_path / 'missing'}]"], "missing: input path does not exist"),
        (["output=s3://b/x", f"endpoint_url=http://127.0.0.1:{free_port()}", "max_files=1"], "cannot reach"),
        (["dtype=uint16", "vocab_size=70000"], "prepare.vocab_size: 70000 overflows uint16"),
    ]
    for args, message in cases:
        proc = subprocess.run([sys.executable, "-m", "moeforge.jobs.prepare", *args], check=False, cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, proc.stderr
        assert "do-not-print-me" not in proc.stdout + proc.stderr
