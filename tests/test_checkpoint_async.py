"""AsyncCheckpointWriter with the real store: snapshot at submit, one checkpoint in flight, ranks that
meet on storage, failure policies, commit timeout, S3 (moto).

Slow or failing writes come from real LocalStorage subclasses: one holds the background thread at its
first storage call until the test releases it (so "the write is still running" is a fact, not a
race), one raises on one file."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import boto3
import pytest
import torch
from moeforge.platform.checkpoint.async_writer import AsyncCheckpointWriter, snapshot_state
from moeforge.platform.checkpoint.pieces import ShardedTensor
from moeforge.platform.checkpoint.state import CheckpointError, OptimizerState, RNGState
from moeforge.platform.checkpoint.store import (
    COMPLETE,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from moeforge.platform.outputs.storage import LocalStorage, S3Options, open_storage

WORLD1 = {"world": {"pp": 1, "dp": 1}, "samples_consumed": 0}


class HeldStorage(LocalStorage):
    """LocalStorage whose checkpoint thread stops at its first call until `release()`."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.reached = threading.Event()  # a checkpoint thread is waiting at the gate

    def release(self) -> None:
        self.gate.set()

    def _hold(self) -> None:
        if threading.current_thread().name.startswith("moeforge-checkpoint-"):
            self.reached.set()
            assert self.gate.wait(30), "test never released the storage"

    def exists(self, rel: str) -> bool:
        self._hold()
        return super().exists(rel)


class FailingStorage(LocalStorage):
    """LocalStorage that fails to write one file name of one step (a full disk, a lost upload)."""

    def __init__(self, root: str, step: int, name: str) -> None:
        super().__init__(root)
        self.target = f"step_{step:08d}/{name}"

    def write_bytes(self, rel: str, data: bytes) -> None:
        if rel.endswith(self.target):
            raise OSError(28, "No space left on device", rel)
        super().write_bytes(rel, data)


def small_state(value: float) -> dict:
    """A module, a plain tensor dict and a ShardedTensor piece (rows 2..3 of a [4, 3] tensor)."""
    layer = torch.nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.fill_(value)
        layer.bias.fill_(value)
    piece = ShardedTensor(torch.full((2, 3), value), (4, 3), offset=6)
    return {"model": layer, "extra": {"counter": torch.tensor([value])}, "pieces": {"w": piece}}


def target_state() -> dict:
    return {
        "model": torch.nn.Linear(4, 3),
        "extra": {"counter": torch.zeros(1)},
        "pieces": {"w": torch.zeros(2, 3)},
    }


def loaded_value(path: str, storage=None) -> float:
    target = target_state()
    load_checkpoint(path, target, storage=storage)
    values = {
        target["model"].weight[0, 0].item(),
        target["extra"]["counter"][0].item(),
        target["pieces"]["w"][0, 0].item(),
    }
    assert len(values) == 1, values
    return values.pop()


def mutate(state: dict, value: float) -> None:
    with torch.no_grad():
        state["model"].weight.fill_(value)
        state["model"].bias.fill_(value)
        state["extra"]["counter"].fill_(value)
        state["pieces"]["w"].local.fill_(value)


# --- the snapshot ----------------------------------------------------------------------------------


def test_snapshot_copies_every_tensor_and_keeps_pieces():
    state = small_state(1.0)
    snap, nbytes = snapshot_state(state)
    assert set(snap) == {"model", "extra", "pieces"}
    piece = snap["pieces"]["w"]
    assert isinstance(piece, ShardedTensor) and (piece.global_shape, piece.offset) == ((4, 3), 6)
    live = [state["model"].weight, state["model"].bias, state["extra"]["counter"], state["pieces"]["w"].local]
    copies = [snap["model"]["weight"], snap["model"]["bias"], snap["extra"]["counter"], piece.local]
    for a, b in zip(live, copies, strict=True):
        assert torch.equal(a, b) and a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    assert nbytes == sum(t.numel() * t.element_size() for t in copies)
    with pytest.raises(TypeError, match=r"state extra/n: int is not a tensor"):
        snapshot_state({"extra": {"n": 3}})


def test_checkpoint_holds_the_state_at_submit_not_after(tmp_path):
    run_dir = str(tmp_path / "run")
    storage = HeldStorage(run_dir)
    state = small_state(1.0)
    writer = AsyncCheckpointWriter(run_dir, storage=storage)
    record = writer.submit(3, state, commit=WORLD1)
    assert storage.reached.wait(10)  # the write has started and is held ...
    mutate(state, 9.0)  # ... while training updates the live tensors in place
    assert writer.in_flight and writer.poll() == []
    storage.release()
    done = writer.close()
    assert done == [(3, checkpoint_path(run_dir, 3))] and latest_checkpoint(run_dir) == done[0][1]
    assert loaded_value(done[0][1]) == 1.0  # the values at submit, exactly
    assert (record.status, record.step, record.commits) == ("done", 3, True)
    assert record.snapshot_s >= 0 and record.write_s is not None and record.bytes == (12 + 3 + 1 + 6) * 4
    tensors = read_meta(done[0][1]).shards["rank0_0"]["tensors"]
    assert (
        tensors["pieces/w"]["global_shape"],
        tensors["pieces/w"]["offset"],
        tensors["pieces/w"]["shape"],
    ) == (
        [4, 3],
        6,
        [2, 3],
    )
    with pytest.raises(RuntimeError, match=r"submit after close"):
        writer.submit(4, state)


def test_real_training_state_round_trips(tmp_path):
    """Module, AdamW state (whose CPU tensors the optimizer updates in place) and RNG states."""
    run_dir = str(tmp_path / "run")
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    state = {
        "model": model,
        "optimizer": OptimizerState(optimizer, model.named_parameters()),
        "rng": RNGState(),
    }
    expected = {
        k: v.clone() for k, v in OptimizerState(optimizer, model.named_parameters()).state_dict().items()
    }
    weight = model.weight.detach().clone()
    with AsyncCheckpointWriter(run_dir) as writer:
        writer.submit(1, state, commit=WORLD1)
        model(torch.randn(2, 8)).sum().backward()
        optimizer.step()  # moves weights and moments in place while the checkpoint may be writing
    fresh = torch.nn.Linear(8, 8)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    fresh(torch.randn(2, 8)).sum().backward()
    fresh_opt.step()
    load_checkpoint(
        latest_checkpoint(run_dir),
        {"model": fresh, "optimizer": OptimizerState(fresh_opt, fresh.named_parameters())},
    )
    assert torch.equal(fresh.weight, weight)
    got = OptimizerState(fresh_opt, fresh.named_parameters()).state_dict()
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


# --- one in flight ---------------------------------------------------------------------------------


def test_a_second_submit_waits_for_the_first_and_both_complete_in_order(tmp_path):
    run_dir = str(tmp_path / "run")
    storage = HeldStorage(run_dir)
    writer = AsyncCheckpointWriter(run_dir, storage=storage)
    writer.submit(1, small_state(1.0), commit=WORLD1)
    assert storage.reached.wait(10)
    second_returned = threading.Event()

    def second() -> None:
        writer.submit(2, small_state(2.0), commit=WORLD1)
        second_returned.set()

    submitter = threading.Thread(target=second)
    submitter.start()
    assert not second_returned.wait(0.5)  # blocked: checkpoint 1 is still in flight
    assert len(writer.history) == 1  # and checkpoint 2 has not even been snapshotted
    storage.release()
    submitter.join(30)
    assert second_returned.is_set()
    assert writer.wait() == [(1, checkpoint_path(run_dir, 1)), (2, checkpoint_path(run_dir, 2))]
    assert [r.step for r in writer.history] == [1, 2] and writer.history[1].wait_s > 0
    assert [s for s, _ in list_checkpoints(run_dir)] == [1, 2]
    assert (
        loaded_value(checkpoint_path(run_dir, 1)) == 1.0 and loaded_value(checkpoint_path(run_dir, 2)) == 2.0
    )


# --- ranks meet on storage -------------------------------------------------------------------------


def test_rank0_commits_only_after_rank1s_manifest(tmp_path):
    run_dir = str(tmp_path / "run")
    held = HeldStorage(run_dir)
    rank0 = AsyncCheckpointWriter(run_dir, poll_s=0.02)
    rank1 = AsyncCheckpointWriter(run_dir, storage=held, poll_s=0.02)
    commit = {"world": {"pp": 2, "dp": 1}, "samples_consumed": 80, "lr_step": 9, "keep": 2}
    rank1.submit(10, small_state(1.5), shard=(1, 0))
    rank0.submit(10, small_state(0.5), shard=(0, 0), commit=commit)
    assert held.reached.wait(10)
    folder = checkpoint_path(run_dir, 10)
    deadline = time.monotonic() + 30
    while not os.path.exists(os.path.join(folder, "rank0_0.json")) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # rank 0's thread polls storage several times meanwhile
    assert os.path.exists(os.path.join(folder, "rank0_0.json"))
    assert not os.path.exists(os.path.join(folder, "rank1_0.json"))
    assert not os.path.exists(os.path.join(folder, COMPLETE)) and rank0.in_flight
    assert rank0.poll() == [] and latest_checkpoint(run_dir) is None
    held.release()
    assert rank1.close() == [(10, folder)]
    assert rank0.close() == [(10, folder)]
    meta = read_meta(folder)
    assert sorted(meta.shards) == ["rank0_0", "rank1_0"] and meta.world == {"pp": 2, "dp": 1}
    assert (meta.samples_consumed, meta.lr_step) == (80, 9)
    for shard, value in (((0, 0), 0.5), ((1, 0), 1.5)):
        target = target_state()
        load_checkpoint(folder, target, shard=shard)
        assert target["model"].weight[0, 0].item() == value


def test_commit_times_out_naming_the_missing_shard(tmp_path):
    run_dir = str(tmp_path / "run")
    writer = AsyncCheckpointWriter(run_dir, commit_timeout_s=0.3, poll_s=0.05)
    writer.submit(5, small_state(1.0), commit={"world": {"pp": 1, "dp": 3}, "samples_consumed": 5})
    with pytest.raises(
        CheckpointError, match=r"step 5 failed: .*shard\(s\) rank0_1, rank0_2 not written within 0.3 s"
    ):
        writer.wait()
    folder = checkpoint_path(run_dir, 5)
    assert os.path.exists(os.path.join(folder, "rank0_0.json"))
    assert not os.path.exists(os.path.join(folder, COMPLETE)) and latest_checkpoint(run_dir) is None
    assert writer.history[0].status == "failed"


# --- failures --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rank0_0.json", COMPLETE])  # while writing the shard / committing
def test_failure_policy_fail_raises_naming_the_step(tmp_path, name):
    run_dir = str(tmp_path / "run")
    save_checkpoint(run_dir, 2, small_state(2.0), samples_consumed=2)
    writer = AsyncCheckpointWriter(run_dir, storage=FailingStorage(run_dir, 4, name), failure="fail")
    writer.submit(4, small_state(4.0), commit={**WORLD1, "keep": 1})
    deadline = time.monotonic() + 30
    with pytest.raises(
        CheckpointError, match=r"async checkpoint of step 4 failed: OSError: .*No space left"
    ) as info:
        while time.monotonic() < deadline:  # poll never blocks: training goes on until it raises
            writer.poll()
            time.sleep(0.01)
    assert isinstance(info.value.__cause__, OSError)
    assert writer.poll() == []  # raised once
    assert (
        latest_checkpoint(run_dir) == checkpoint_path(run_dir, 2)
        and loaded_value(latest_checkpoint(run_dir)) == 2.0
    )
    assert os.path.exists(
        os.path.join(checkpoint_path(run_dir, 4), "rank0_0.safetensors")
    )  # a leftover, no marker

    # The next submit raises the failure in flight before it snapshots or writes anything.
    writer = AsyncCheckpointWriter(run_dir, storage=FailingStorage(run_dir, 8, name), failure="fail")
    writer.submit(8, small_state(8.0), commit=WORLD1)
    with pytest.raises(CheckpointError, match=r"async checkpoint of step 8 failed"):
        writer.submit(10, small_state(10.0), commit=WORLD1)
    assert not os.path.exists(checkpoint_path(run_dir, 10)) and [r.step for r in writer.history] == [8]
    assert [s for s, _ in list_checkpoints(run_dir)] == [2]


def test_failure_policy_continue_logs_counts_and_trains_on(tmp_path):
    run_dir = str(tmp_path / "run")
    lines: list[str] = []
    writer = AsyncCheckpointWriter(
        run_dir, storage=FailingStorage(run_dir, 4, "rank0_0.json"), failure="continue", log=lines.append
    )
    writer.submit(2, small_state(2.0), commit=WORLD1)
    assert writer.wait() == [(2, checkpoint_path(run_dir, 2))]
    writer.submit(4, small_state(4.0), commit={**WORLD1, "keep": 1})
    assert writer.wait() == [] and writer.wait() == []
    assert writer.failures == 1 and isinstance(writer.last_error, OSError)
    assert len(lines) == 1 and "step 4 failed" in lines[0] and "training continues" in lines[0]
    assert (
        latest_checkpoint(run_dir) == checkpoint_path(run_dir, 2)
        and loaded_value(latest_checkpoint(run_dir)) == 2.0
    )
    writer.submit(6, small_state(6.0), commit={**WORLD1, "keep": 1})
    assert writer.close() == [(6, checkpoint_path(run_dir, 6))]
    assert [s for s, _ in list_checkpoints(run_dir)] == [6] and loaded_value(
        latest_checkpoint(run_dir)
    ) == 6.0
    assert [r.status for r in writer.history] == ["done", "failed", "done"] and len(lines) == 1


def test_bad_arguments_fail_in_the_callers_thread(tmp_path):
    with pytest.raises(ValueError, match=r"failure: must be one of fail, continue, got 'retry'"):
        AsyncCheckpointWriter(str(tmp_path), failure="retry")
    writer = AsyncCheckpointWriter(str(tmp_path))
    with pytest.raises(ValueError, match=r"commit: unknown key 'storage'"):
        writer.submit(1, small_state(1.0), commit={**WORLD1, "storage": None})
    with pytest.raises(ValueError, match=r"commit: missing 'samples_consumed'"):
        writer.submit(1, small_state(1.0), commit={"world": {"pp": 1, "dp": 1}})
    with pytest.raises(ValueError, match=r"shard \(0, -1\): ranks must be >= 0"):
        writer.submit(1, small_state(1.0), shard=(0, -1))
    assert writer.history == [] and not os.path.exists(checkpoint_path(str(tmp_path), 1))


# --- S3 (moto server) ------------------------------------------------------------------------------


def test_s3_async_checkpoint_completes(s3_server):
    bucket = f"ckpt-async-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    run_dir = f"s3://{bucket}/runs/async"
    storage = open_storage(run_dir, S3Options(endpoint_url=s3_server))
    state = small_state(3.0)
    with AsyncCheckpointWriter(run_dir, storage=storage, poll_s=0.05) as writer:
        writer.submit(
            7, state, commit={"world": {"pp": 1, "dp": 1}, "samples_consumed": 7, "extra": {"a": 1}}
        )
        mutate(state, -1.0)
        writer.submit(8, state, commit={"world": {"pp": 1, "dp": 1}, "samples_consumed": 8, "keep": 1})
        done = writer.wait()
    assert done == [(7, f"{run_dir}/checkpoints/step_00000007"), (8, f"{run_dir}/checkpoints/step_00000008")]
    assert [s for s, _ in list_checkpoints(run_dir, storage)] == [8]  # keep=1 pruned step 7 after 8 completed
    assert loaded_value(latest_checkpoint(run_dir, storage), storage) == -1.0
    marker = json.loads(storage.read_text("checkpoints/step_00000008/COMPLETE"))
    assert set(marker) == {"meta_sha256"}
