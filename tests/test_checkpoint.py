"""Checkpoints: exact resume of the tiny model, crash safety, corruption, retention, shards, S3 (moto)."""

from __future__ import annotations

import json
import os
import uuid

import boto3
import pytest
import torch
import yaml
from botocore.exceptions import ConnectionClosedError
from moeforge.model.config import ModelConfig
from moeforge.model.transformer import build_model
from moeforge.platform.checkpoint.state import (
    OptimizerState,
    RNGState,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
)
from moeforge.platform.checkpoint.store import (
    COMPLETE,
    CheckpointError,
    checkpoint_path,
    commit_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_meta,
    save_checkpoint,
    save_shard,
)
from moeforge.platform.config.builder import build_config
from moeforge.platform.optim.bias_update import update_router_biases
from moeforge.platform.outputs.storage import S3Options, open_storage

from tests.conftest import REPO_ROOT

BATCH, SEQ = 2, 16


def tiny_config() -> ModelConfig:
    with open(os.path.join(REPO_ROOT, "conf", "model", "tiny.yaml")) as f:
        values = yaml.safe_load(f)
    values.pop("arch")
    return build_config(ModelConfig, values, "model")


class TinyRun:
    """The tiny model, AdamW and a step that draws its tokens from the global torch RNG (so the RNG
    state matters) and moves the router biases (so the buffers matter)."""

    def __init__(self, cfg: ModelConfig, seed: int, reverse_params: bool = False) -> None:
        self.cfg = cfg
        self.model = build_model(cfg, seed=seed)
        self.model.train()
        params = [p for p in self.model.parameters()]
        if reverse_params:  # the optimizer's parameter order must not matter to the checkpoint
            params = params[::-1]
        self.optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1)
        self.moe = list(self.model.moe_layers())
        self.step = 0

    def state(self, optimizer: bool = True) -> dict:
        out = {"model": self.model, "rng": RNGState()}
        if optimizer:
            out["optimizer"] = OptimizerState(self.optimizer, self.model.named_parameters())
        return out

    def train(self, steps: int) -> list[float]:
        losses = []
        for _ in range(steps):
            tokens = torch.randint(0, self.cfg.vocab_size, (BATCH, SEQ + 1))
            out = self.model(tokens[:, :-1], labels=tokens[:, 1:])
            out.loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            update_router_biases(self.moe, gamma=0.01)  # also resets the load counters
            self.step += 1
            losses.append(out.loss.item())
        return losses


def _save(run: TinyRun, run_dir: str, **kw) -> str:
    return save_checkpoint(run_dir, run.step, run.state(), samples_consumed=run.step * BATCH, **kw)


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return tiny_config()


# --- exact resume ----------------------------------------------------------------------------------


def test_resume_reproduces_losses_bitwise(cfg, tmp_path):
    run_dir = str(tmp_path / "run")
    torch.manual_seed(0)
    first = TinyRun(cfg, seed=1)
    first.train(3)
    path = _save(first, run_dir, config={"model": "tiny", "lr": 3e-3}, keep=2)
    expected = first.train(3)

    torch.manual_seed(99)  # a different RNG, different weights, reversed optimizer order
    resumed = TinyRun(cfg, seed=2, reverse_params=True)
    assert latest_checkpoint(run_dir) == path == checkpoint_path(run_dir, 3)
    meta = load_checkpoint(path, resumed.state())
    assert (meta.step, meta.samples_consumed, meta.lr_step, meta.world) == (3, 6, 3, {"pp": 1, "dp": 1})
    assert meta.config_hash and len(meta.config_hash) == 64
    tensors = meta.shards["rank0_0"]["tensors"]
    assert "model/layers.1.mlp.gate.e_score_correction_bias" in tensors
    assert tensors["optimizer/embed.weight/exp_avg_sq"]["shape"] == [cfg.vocab_size, cfg.hidden_size]
    assert tensors["rng/torch_cpu"]["dtype"] == "uint8"
    assert resumed.train(3) == expected  # bitwise: Python floats of fp32 losses compared exactly

    # Control: without the optimizer moments the same continuation differs, so the check above
    # really depends on what the checkpoint restored.
    torch.manual_seed(99)
    partial = TinyRun(cfg, seed=2)
    load_checkpoint(path, partial.state(optimizer=False))
    assert partial.train(3) != expected


def test_optimizer_state_is_keyed_by_name_not_order():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    saved = optimizer_state_to_tensors(opt, model.named_parameters())
    assert sorted(saved) == sorted(
        f"{n}/{k}" for n, _ in model.named_parameters() for k in ("step", "exp_avg", "exp_avg_sq")
    )

    other = torch.optim.AdamW(list(model.parameters())[::-1], lr=0.1)
    optimizer_state_from_tensors(other, model.named_parameters(), saved)
    for name, param in model.named_parameters():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(other.state[param][key], opt.state[param][key]), f"{name}/{key}"

    bad = dict(saved, **{"0.weight/exp_avg": torch.zeros(4, 3)})
    with pytest.raises(
        CheckpointError, match=r"0\.weight/exp_avg: shape \(4, 3\) does not match .* \(3, 4\)"
    ):
        optimizer_state_from_tensors(other, model.named_parameters(), bad)
    with pytest.raises(CheckpointError, match=r"9\.bias/exp_avg: no parameter named '9\.bias'"):
        optimizer_state_from_tensors(
            other, model.named_parameters(), dict(saved, **{"9.bias/exp_avg": torch.zeros(2)})
        )
    partial = {k: v for k, v in saved.items() if k != "1.bias/exp_avg_sq"}
    with pytest.raises(CheckpointError, match=r"1\.bias/exp_avg_sq: missing"):
        optimizer_state_from_tensors(other, model.named_parameters(), partial)


# --- crash safety, corruption, mismatches ----------------------------------------------------------


def _small_state(value: float, out_features: int = 3) -> dict:
    layer = torch.nn.Linear(4, out_features)
    with torch.no_grad():
        layer.weight.fill_(value)
        layer.bias.fill_(value)
    return {"model": layer, "extra": {"counter": torch.tensor([value])}}


def test_half_written_checkpoint_is_ignored(tmp_path):
    run_dir = str(tmp_path / "run")
    assert latest_checkpoint(run_dir) is None
    save_checkpoint(run_dir, 2, _small_state(2.0), samples_consumed=4)
    save_shard(run_dir, 4, _small_state(4.0))  # the process "dies" before the commit
    assert os.path.isfile(os.path.join(checkpoint_path(run_dir, 4), "rank0_0.safetensors"))
    assert latest_checkpoint(run_dir) == checkpoint_path(run_dir, 2)
    with pytest.raises(CheckpointError, match=r"step_00000004/COMPLETE: missing"):
        load_checkpoint(checkpoint_path(run_dir, 4), _small_state(0.0))

    target = _small_state(0.0)
    load_checkpoint(latest_checkpoint(run_dir), target)
    assert target["model"].weight[0, 0].item() == 2.0 and float(target["extra"]["counter"]) == 2.0

    # The restarted run saves step 4 again over the leftovers; now it counts.
    save_checkpoint(run_dir, 4, _small_state(4.5), samples_consumed=8)
    assert [s for s, _ in list_checkpoints(run_dir)] == [2, 4]
    load_checkpoint(latest_checkpoint(run_dir), target)
    assert target["model"].bias[0].item() == 4.5


def test_corrupt_or_missing_file_names_the_path(tmp_path):
    run_dir = str(tmp_path / "run")
    path = save_checkpoint(run_dir, 1, _small_state(1.0), samples_consumed=1)
    shard = os.path.join(path, "rank0_0.safetensors")
    with open(shard, "rb") as f:
        data = bytearray(f.read())
    data[-1] ^= 0xFF  # flip one bit of the last tensor byte: same size, different content
    with open(shard, "wb") as f:
        f.write(data)
    with pytest.raises(CheckpointError, match=rf"{shard}: sha256 .* \(corrupt\)"):
        load_checkpoint(path, _small_state(0.0))
    with open(shard, "ab") as f:
        f.write(b"x")
    with pytest.raises(CheckpointError, match=rf"{shard}: .* bytes, meta.json says"):
        load_checkpoint(path, _small_state(0.0))
    with open(shard, "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=rf"{shard}: not a readable safetensors file"):
        load_checkpoint(path, _small_state(0.0), verify=False)
    os.unlink(shard)
    with pytest.raises(CheckpointError, match=rf"{shard}: missing"):
        load_checkpoint(path, _small_state(0.0))

    meta_path = os.path.join(path, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["step"] = 7  # a tampered manifest no longer matches the marker
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(CheckpointError, match=rf"{meta_path}: sha256 does not match"):
        read_meta(path)


def test_mismatched_model_names_the_key(tmp_path):
    path = save_checkpoint(str(tmp_path / "run"), 1, _small_state(1.0), samples_consumed=1)
    with pytest.raises(
        CheckpointError,
        match=r"rank0_0\.safetensors: model/weight: checkpoint shape \[3, 4\] != model shape \[5, 4\]",
    ):
        load_checkpoint(path, _small_state(0.0, out_features=5))
    no_bias = {"model": torch.nn.Linear(4, 3, bias=False)}
    with pytest.raises(CheckpointError, match=r"model/bias: in the checkpoint but not in the model"):
        load_checkpoint(path, no_bias)
    with pytest.raises(CheckpointError, match=r"no 'optimizer' state \(saved parts: model, extra\)"):
        load_checkpoint(path, {"optimizer": {}})
    only_model = {"model": torch.nn.Linear(4, 3)}  # weights only: other parts are not read
    load_checkpoint(path, only_model)
    assert torch.equal(only_model["model"].weight, torch.full((3, 4), 1.0))


def test_views_of_one_flat_buffer_round_trip(tmp_path):
    flat = torch.arange(10.0)  # e.g. parameters living in one flat ZeRO buffer
    path = save_checkpoint(
        str(tmp_path / "run"), 1, {"x": {"a": flat[:4], "b": flat[4:].view(2, 3)}}, samples_consumed=0
    )
    target = {"x": {"a": torch.zeros(4), "b": torch.zeros(2, 3)}}
    load_checkpoint(path, target)
    assert torch.equal(target["x"]["a"], flat[:4]) and torch.equal(target["x"]["b"], flat[4:].view(2, 3))


def test_retention_keeps_newest_complete(tmp_path):
    run_dir = str(tmp_path / "run")
    save_shard(run_dir, 0, _small_state(0.0))  # crash leftover, older than what follows
    for step in range(1, 6):
        save_checkpoint(run_dir, step, _small_state(float(step)), samples_consumed=step, keep=2)
        assert [s for s, _ in list_checkpoints(run_dir)][-1] == step
    save_shard(run_dir, 6, _small_state(6.0))  # a save in progress (newer): never pruned
    save_checkpoint(run_dir, 7, _small_state(7.0), samples_consumed=7, keep=2)
    assert [s for s, _ in list_checkpoints(run_dir)] == [5, 7]
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["step_00000005", "step_00000007"]

    # Saving a step that is already complete leaves it untouched.
    save_checkpoint(run_dir, 7, _small_state(70.0), samples_consumed=7, keep=2)
    target = _small_state(0.0)
    load_checkpoint(latest_checkpoint(run_dir), target)
    assert target["model"].weight[0, 0].item() == 7.0


def test_sharded_ranks_and_commit_after_all_shards(tmp_path):
    run_dir = str(tmp_path / "run")
    save_shard(run_dir, 10, _small_state(0.5), shard=(0, 0))
    with pytest.raises(CheckpointError, match=r"rank1_0\.json: shard rank1_0 was not written"):
        commit_checkpoint(run_dir, 10, world={"pp": 2, "dp": 1}, samples_consumed=80)
    assert latest_checkpoint(run_dir) is None
    save_shard(run_dir, 10, _small_state(1.5, out_features=2), shard=(1, 0))
    path = commit_checkpoint(run_dir, 10, world={"pp": 2, "dp": 1}, samples_consumed=80, lr_step=9)
    assert latest_checkpoint(run_dir) == path
    assert sorted(os.listdir(path)) == [
        COMPLETE,
        "meta.json",
        "rank0_0.json",
        "rank0_0.safetensors",
        "rank1_0.json",
        "rank1_0.safetensors",
    ]
    stage0, stage1 = _small_state(0.0), _small_state(0.0, out_features=2)
    meta = load_checkpoint(path, stage0, shard=(0, 0))
    load_checkpoint(path, stage1, shard=(1, 0))
    assert (meta.samples_consumed, meta.lr_step, sorted(meta.shards)) == (80, 9, ["rank0_0", "rank1_0"])
    assert stage0["model"].weight[0, 0].item() == 0.5 and stage1["model"].weight[0, 0].item() == 1.5
    with pytest.raises(
        CheckpointError, match=r"no shard rank0_1 \(checkpoint world dp=1 pp=2, shards rank0_0, rank1_0\)"
    ):
        load_checkpoint(path, stage0, shard=(0, 1))


# --- S3 (moto server) ------------------------------------------------------------------------------


@pytest.fixture
def bucket(s3_server):
    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


def test_s3_round_trip_resume_retention_and_corruption(cfg, s3_server, bucket, monkeypatch):
    run_dir = f"s3://{bucket}/runs/tiny"
    storage = open_storage(run_dir, S3Options(endpoint_url=s3_server))
    torch.manual_seed(0)
    first = TinyRun(cfg, seed=1)
    for _ in range(3):
        first.train(1)
        _save(first, run_dir, keep=2, storage=storage)
    save_shard(run_dir, 9, first.state(), storage=storage)  # half-written: no marker
    assert [s for s, _ in list_checkpoints(run_dir, storage)] == [2, 3]
    path = latest_checkpoint(run_dir, storage)
    assert path == f"{run_dir}/checkpoints/step_00000003"
    expected = first.train(2)

    # Opened by URL alone, as a new process would (endpoint from the standard AWS environment).
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    torch.manual_seed(5)
    resumed = TinyRun(cfg, seed=3)
    assert load_checkpoint(path, resumed.state()).step == 3
    assert resumed.train(2) == expected

    key = "runs/tiny/checkpoints/step_00000003/rank0_0.safetensors"
    client = boto3.client("s3", endpoint_url=s3_server)
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x01
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    with pytest.raises(CheckpointError, match=rf"s3://{bucket}/{key}: sha256 .* \(corrupt\)"):
        load_checkpoint(path, resumed.state(), storage=storage)


def test_s3_failure_while_committing_keeps_previous_checkpoint(s3_server, bucket):
    run_dir = f"s3://{bucket}/run"
    save_checkpoint(
        run_dir,
        1,
        _small_state(1.0),
        samples_consumed=1,
        storage=open_storage(run_dir, S3Options(endpoint_url=s3_server)),
    )
    flaky = open_storage(run_dir, S3Options(endpoint_url=s3_server, max_attempts=1))

    def drop_marker_upload(request, **_):  # a real connection failure on the wire, for COMPLETE only
        if request.url.split("?")[0].endswith("/" + COMPLETE) and "step_00000002" in request.url:
            raise ConnectionClosedError(endpoint_url=request.url)

    flaky.client.meta.events.register("before-send.s3.PutObject", drop_marker_upload)
    with pytest.raises(Exception, match="Connection was closed"):
        save_checkpoint(run_dir, 2, _small_state(2.0), samples_consumed=2, keep=1, storage=flaky)
    assert flaky.exists("checkpoints/step_00000002/meta.json")  # everything but the marker landed
    assert [s for s, _ in list_checkpoints(run_dir, flaky)] == [1]  # and step 1 was not pruned
    target = _small_state(0.0)
    load_checkpoint(latest_checkpoint(run_dir, flaky), target, storage=flaky)
    assert target["model"].weight[0, 0].item() == 1.0
