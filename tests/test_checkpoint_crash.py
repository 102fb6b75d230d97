"""Checkpoints survive a writer process SIGKILLed in the middle of writing one (local and S3).

Each test starts tests/checkpoint_writer_proc.py as a real child process, watches the files (or the
S3 multipart uploads) it produces, and `os.kill(pid, SIGKILL)`s it at a chosen point: while a shard's
tensor data is being written, while the finished shard file is hashed (before its rename), after
every shard but before COMPLETE, and mid multipart upload. Each test first proves the kill landed
where it meant to (return code -9 and the partial file/upload seen), then that the previous
checkpoint is still the latest and loads exactly, that the interrupted one is never listed nor
loadable, and that the next uninterrupted save works and prunes. Last, one byte flipped inside a
shard's tensor data (test_checkpoint.py covers truncation, bad headers and single-shard flips).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import uuid

import boto3
import pytest
import torch
from moeforge.platform.checkpoint.store import (
    COMPLETE,
    META,
    CheckpointError,
    checkpoint_path,
    commit_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_shard,
)
from moeforge.platform.outputs.storage import S3Options, open_storage

WRITER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoint_writer_proc.py")
MiB = 1 << 20

pytestmark = pytest.mark.timeout(180)


# --- helpers ---------------------------------------------------------------------------------------


def _small_states(step: int, shards: int) -> list[dict]:
    """Distinct random small tensors per shard (same keys as the writer's shards)."""
    gen = torch.Generator().manual_seed(1000 + step)
    return [
        {
            "model": {"big": torch.randn(6, generator=gen)},
            "extra": {"counter": torch.tensor([step * 10 + pp], dtype=torch.int64)},
        }
        for pp in range(shards)
    ]


def _save_small(
    run_dir: str, step: int, shards: int = 2, keep: int | None = None, storage=None
) -> list[dict]:
    """A complete checkpoint of `step` written as `shards` pipeline ranks then rank 0's commit."""
    states = _small_states(step, shards)
    for pp, state in enumerate(states):
        save_shard(run_dir, step, state, shard=(pp, 0), storage=storage)
    commit_checkpoint(
        run_dir, step, world={"pp": shards, "dp": 1}, samples_consumed=step, keep=keep, storage=storage
    )
    return states


def _zeros_like(state: dict) -> dict:
    return {part: {k: torch.zeros_like(v) for k, v in tensors.items()} for part, tensors in state.items()}


def _assert_loads(path: str, states: list[dict], storage=None) -> None:
    """Every shard of the checkpoint at `path` restores exactly `states`."""
    for pp, expected in enumerate(states):
        target = _zeros_like(expected)
        load_checkpoint(path, target, shard=(pp, 0), storage=storage)
        for part, tensors in expected.items():
            for key, value in tensors.items():
                assert torch.equal(target[part][key], value), f"{path} shard {pp}: {part}/{key} differs"


def _steps(run_dir: str, storage=None) -> list[int]:
    return [step for step, _ in list_checkpoints(run_dir, storage)]


def _scan(folder: str) -> dict[str, tuple[int, int]]:
    """{file name: (size, bytes allocated on disk)} in `folder` right now (files may vanish)."""
    out = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            with contextlib.suppress(FileNotFoundError):
                st = entry.stat()
                out[entry.name] = (st.st_size, st.st_blocks * 512)
    return out


def _is_staging(name: str) -> bool:
    """safetensors' own temp file (Rust `tempfile`, ".tmpXXXXXX"): it sizes the file first, fills
    it, then renames it onto store.py's `.tmp-<target>-*` temp, which is renamed onto the target."""
    return name.startswith(".tmp") and not name.startswith(".tmp-")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 * MiB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _data_span(path: str) -> tuple[int, int]:
    """(start, end) of the tensor data of a safetensors file, from its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return 8 + n, 8 + n + end


def _assert_final_shards_whole(folder: str) -> list[str]:
    """Every file at a final shard name is a whole safetensors file (its header's data ends where
    the file ends) and matches its manifest's size and sha256 when the manifest exists."""
    finals = sorted(n for n in os.listdir(folder) if re.fullmatch(r"rank\d+_\d+\.safetensors", n))
    for name in finals:
        path = os.path.join(folder, name)
        size = os.path.getsize(path)
        assert _data_span(path)[1] == size, f"{path}: truncated ({size} bytes, header says more)"
        manifest_path = path.removesuffix(".safetensors") + ".json"
        if os.path.exists(manifest_path):
            with open(manifest_path) as f:
                manifest = json.load(f)
            assert (manifest["bytes"], manifest["sha256"]) == (size, _sha256(path)), path
    return finals


class _Writer:
    """One tests/checkpoint_writer_proc.py child process; stdout and stderr go to a log file."""

    def __init__(self, proc: subprocess.Popen, log_path) -> None:
        self.proc, self.log_path = proc, log_path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_for(self, condition, what: str, timeout: float = 90.0, interval: float = 0.001):
        """Poll `condition()` until it returns something truthy (returned), failing if the writer
        exits first or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            found = condition()
            if found:
                return found
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"writer exited ({self.proc.returncode}) before {what}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s:\n{self.output()}")
            time.sleep(interval)

    def sigkill(self) -> int:
        os.kill(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:  # a failed assertion left it running: end it (ours, by pid)
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@contextlib.contextmanager
def _writer(
    tmp_path,
    run_dir: str,
    *,
    step: int,
    mib: float,
    shards: int,
    pause: float = 0.0,
    part_mib: int = 0,
    env=None,
):
    """Start the writer for checkpoint `step` of `run_dir`; it is SIGKILLed on the way out if alive."""
    log_path = tmp_path / f"writer-step{step}.log"
    args = [WRITER, run_dir, "--step", str(step), "--mib", str(mib), "--shards", str(shards)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, *args, "--pause", str(pause), "--part-mib", str(part_mib)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=env,
        )
        writer = _Writer(proc, log_path)
        try:
            yield writer
        finally:
            writer.close()


# --- local -----------------------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path):
    """A local run.dir, removed afterwards: killed writers leave 100+ MiB temp files in it."""
    path = tmp_path / "run"
    yield str(path)
    shutil.rmtree(path, ignore_errors=True)


def test_local_kill_while_a_shard_is_being_written(tmp_path, run_dir):
    """Killed while rank1_0's tensor data is half on disk (rank0_0 already whole)."""
    step1 = _save_small(run_dir, 1)
    folder = checkpoint_path(run_dir, 2)

    def second_shard_half_written():
        files = _scan(folder)
        partial = [n for n, (size, alloc) in files.items() if _is_staging(n) and alloc < size]
        return files if "rank0_0.json" in files and partial else None

    with _writer(tmp_path, run_dir, step=2, mib=192, shards=2) as writer:
        seen = writer.wait_for(second_shard_half_written, "a half-written rank1_0 shard")
        assert writer.sigkill() == -signal.SIGKILL
    assert "shard 0 written" in writer.output() and "shard 1 written" not in writer.output()

    # The kill landed mid-write: the data file is still partly unwritten, and store.py's atomic
    # write never reached its rename.
    after = _scan(folder)
    partial = {n: v for n, v in after.items() if _is_staging(n)}
    assert len(partial) == 1, (seen, after)
    ((size, allocated),) = partial.values()
    assert allocated < size and size > 192 * MiB, (seen, after)
    assert [n for n in after if n.startswith(".tmp-rank1_0.safetensors-")], after
    assert not {"rank1_0.safetensors", "rank1_0.json", META, COMPLETE} & set(after), after
    assert _assert_final_shards_whole(folder) == ["rank0_0.safetensors"]

    assert latest_checkpoint(run_dir) == checkpoint_path(run_dir, 1)
    assert list_checkpoints(run_dir) == [(1, checkpoint_path(run_dir, 1))]
    _assert_loads(checkpoint_path(run_dir, 1), step1)
    with pytest.raises(CheckpointError, match=rf"{re.escape(folder)}/{COMPLETE}: missing"):
        load_checkpoint(folder, _zeros_like(step1[0]))
    # A restarted rank 0 cannot commit the dead writer's half checkpoint.
    with pytest.raises(CheckpointError, match=r"rank1_0\.json: shard rank1_0 was not written"):
        commit_checkpoint(run_dir, 2, world={"pp": 2, "dp": 1}, samples_consumed=2)
    assert _steps(run_dir) == [1]

    # The restarted run saves step 2 again, uninterrupted: it is the latest, and keep=1 prunes step 1.
    step2 = _save_small(run_dir, 2, keep=1)
    assert list_checkpoints(run_dir) == [(2, folder)] and latest_checkpoint(run_dir) == folder
    _assert_loads(folder, step2)
    assert _assert_final_shards_whole(folder) == ["rank0_0.safetensors", "rank1_0.safetensors"]
    assert os.listdir(os.path.join(run_dir, "checkpoints")) == ["step_00000002"]


def test_local_kill_after_every_shard_before_commit(tmp_path, run_dir):
    """Killed with both shards and manifests written but no meta.json / COMPLETE (the writer
    script sleeps between its last save_shard and commit_checkpoint)."""
    step1 = _save_small(run_dir, 1)
    folder = checkpoint_path(run_dir, 2)

    def every_shard_written():
        files = _scan(folder)
        return files if {"rank0_0.json", "rank1_0.json"} <= set(files) else None

    with _writer(tmp_path, run_dir, step=2, mib=1, shards=2, pause=120) as writer:
        seen = writer.wait_for(every_shard_written, "both shard manifests")
        assert writer.sigkill() == -signal.SIGKILL
    assert not {META, COMPLETE} & set(seen), seen
    assert "shard 0 written" in writer.output() and "committed" not in writer.output()

    after = _scan(folder)
    assert sorted(after) == ["rank0_0.json", "rank0_0.safetensors", "rank1_0.json", "rank1_0.safetensors"]
    assert _assert_final_shards_whole(folder) == ["rank0_0.safetensors", "rank1_0.safetensors"]
    assert latest_checkpoint(run_dir) == checkpoint_path(run_dir, 1)
    assert _steps(run_dir) == [1]
    _assert_loads(checkpoint_path(run_dir, 1), step1)
    with pytest.raises(CheckpointError, match=rf"{re.escape(folder)}/{COMPLETE}: missing"):
        load_checkpoint(folder, _zeros_like(step1[0]))

    # Saved again over the dead writer's whole-but-uncommitted shards: the new data wins.
    step2 = _save_small(run_dir, 2, keep=1)
    assert list_checkpoints(run_dir) == [(2, folder)]
    _assert_loads(folder, step2)
    assert os.listdir(os.path.join(run_dir, "checkpoints")) == ["step_00000002"]


def test_local_kill_while_hashing_a_shard_leaves_nothing_after_prune(tmp_path, run_dir):
    """Killed after safetensors wrote the whole shard to store.py's `.tmp-rank0_0.safetensors-*`
    temp, while it is hashed and before its rename. The step never becomes a checkpoint; once a
    newer checkpoint prunes it, none of it (the full-size temp included) may stay on disk."""
    _save_small(run_dir, 1)
    folder = checkpoint_path(run_dir, 2)

    def shard_being_hashed():
        files = _scan(folder)
        hashing = [n for n, (size, _) in files.items() if n.startswith(".tmp-rank0_0.safetensors-") and size]
        return files if hashing and "rank0_0.safetensors" not in files else None

    with _writer(tmp_path, run_dir, step=2, mib=96, shards=1) as writer:
        writer.wait_for(shard_being_hashed, "the shard's temp file being hashed")
        assert writer.sigkill() == -signal.SIGKILL
    after = _scan(folder)
    assert len(after) == 1 and next(iter(after)).startswith(".tmp-rank0_0.safetensors-"), after
    assert next(iter(after.values()))[0] > 96 * MiB  # the whole shard, never renamed into place
    assert _steps(run_dir) == [1]
    with pytest.raises(CheckpointError, match=rf"{re.escape(folder)}/{COMPLETE}: missing"):
        load_checkpoint(folder, _zeros_like(_small_states(1, 1)[0]))

    step3 = _save_small(run_dir, 3, keep=1)
    assert list_checkpoints(run_dir) == [(3, checkpoint_path(run_dir, 3))]
    _assert_loads(checkpoint_path(run_dir, 3), step3)
    left = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    assert left == ["step_00000003"], (
        f"pruning left {left}: {folder} still holds {_scan(folder)} from the killed writer "
        "(prune_checkpoints never sees or removes `.tmp-*` files)"
    )


# --- S3 (moto server) ------------------------------------------------------------------------------


@pytest.fixture
def bucket(s3_server):
    name = f"ckpt-crash-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


def test_s3_kill_mid_multipart_upload(s3_server, bucket, tmp_path):
    """Killed while boto3 uploads a 64 MiB shard as a multipart upload of 8 MiB parts."""
    run_dir = f"s3://{bucket}/run"
    storage = open_storage(run_dir, S3Options(endpoint_url=s3_server))
    step1 = _save_small(run_dir, 1, storage=storage)
    client = boto3.client("s3", endpoint_url=s3_server)
    key = "run/checkpoints/step_00000002/rank0_0.safetensors"
    child_tmp = tmp_path / "writer-tmp"  # where the child stages the shard before uploading it
    child_tmp.mkdir()
    # The child opens the run by URL alone: endpoint and keys from the AWS environment the fixture set.
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_server, "TMPDIR": str(child_tmp)}

    def pending_uploads() -> list[dict]:
        return client.list_multipart_uploads(Bucket=bucket, Prefix="run/").get("Uploads", [])

    def parts(upload: dict) -> int:
        try:
            listed = client.list_parts(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        except client.exceptions.NoSuchUpload:  # completed (or aborted) since it was listed
            return 0
        return len(listed.get("Parts", []))

    def upload_under_way():
        for upload in pending_uploads():
            if upload["Key"] == key and parts(upload):
                return upload
        return None

    try:
        with _writer(tmp_path, run_dir, step=2, mib=64, shards=1, part_mib=8, env=env) as writer:
            upload = writer.wait_for(upload_under_way, "a multipart upload with parts", interval=0.02)
            assert writer.sigkill() == -signal.SIGKILL
        # The upload was neither completed nor aborted: the process died in the middle of it.
        still = [u for u in pending_uploads() if u["UploadId"] == upload["UploadId"]]
        assert still and parts(still[0]) >= 1, writer.output()
        assert not storage.exists("checkpoints/step_00000002/rank0_0.safetensors")
        assert storage.list("checkpoints/step_00000002") == []  # not even a manifest

        assert _steps(run_dir, storage) == [1]
        assert latest_checkpoint(run_dir, storage) == checkpoint_path(run_dir, 1)
        _assert_loads(checkpoint_path(run_dir, 1), step1, storage=storage)
        with pytest.raises(
            CheckpointError, match=rf"{re.escape(checkpoint_path(run_dir, 2))}/{COMPLETE}: missing"
        ):
            load_checkpoint(checkpoint_path(run_dir, 2), _zeros_like(step1[0]), storage=storage)

        step2 = _save_small(run_dir, 2, keep=1, storage=storage)
        assert list_checkpoints(run_dir, storage) == [(2, checkpoint_path(run_dir, 2))]
        _assert_loads(checkpoint_path(run_dir, 2), step2, storage=storage)
        assert storage.list("checkpoints/step_00000001") == []
    finally:
        for leftover in pending_uploads():  # free moto's memory (a real bucket wants a lifecycle rule)
            client.abort_multipart_upload(Bucket=bucket, Key=leftover["Key"], UploadId=leftover["UploadId"])
        shutil.rmtree(child_tmp, ignore_errors=True)


# --- one flipped byte ------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "s3"])
def test_one_flipped_byte_in_a_shards_data_names_that_file(where, tmp_path, request):
    """One byte flipped in the middle of rank1_0's tensor data: loading that shard fails naming the
    file and sha256; the other shard still loads exactly."""
    if where == "local":
        run_dir, storage = str(tmp_path / "run"), None
    else:
        s3_server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("bucket")
        run_dir = f"s3://{bucket}/run"
        storage = open_storage(run_dir, S3Options(endpoint_url=s3_server))
    states = _save_small(run_dir, 5, storage=storage)
    path = checkpoint_path(run_dir, 5)
    shard_url = f"{path}/rank1_0.safetensors"

    local = str(tmp_path / "rank1_0.safetensors")
    if storage is None:
        shutil.copyfile(shard_url, local)
    else:
        storage.download("checkpoints/step_00000005/rank1_0.safetensors", local)
    start, end = _data_span(local)
    with open(local, "r+b") as f:
        f.seek((start + end) // 2)
        byte = f.read(1)
        f.seek((start + end) // 2)
        f.write(bytes([byte[0] ^ 0x10]))
    if storage is None:
        shutil.copyfile(local, shard_url)
    else:
        storage.upload(local, "checkpoints/step_00000005/rank1_0.safetensors")

    with pytest.raises(CheckpointError, match=rf"^{re.escape(shard_url)}: sha256 .* \(corrupt\)"):
        load_checkpoint(path, _zeros_like(states[1]), shard=(1, 0), storage=storage)
    _assert_loads(path, states[:1], storage=storage)  # rank0_0 is untouched
