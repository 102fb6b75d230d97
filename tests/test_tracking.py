"""Tracking: a real W&B offline run read back from its .wandb file; rank/backend gating; mode
resolution; console progress lines."""

from __future__ import annotations

import glob
import json
import struct

import pytest
from moeforge.platform.config.tracking import TrackingConfig
from moeforge.platform.outputs.metrics import StepMetrics, TrainSummary
from moeforge.platform.outputs.tracking import (
    ConsoleProgress,
    NullTracker,
    WandbTracker,
    make_tracker,
    resolve_mode,
)

_BLOCK, _HEADER = 32768, 7  # W&B's .wandb file: LevelDB-log framing of protobuf Records


def read_wandb_records(path: str) -> list:
    """Every protobuf Record in an offline run's .wandb file (a small reader of its log framing)."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", "not a W&B datastore file"
    pos, payloads, pending = _HEADER, [], b""
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # a record header never straddles a block: padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 1:  # full
            payloads.append(chunk)
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            payloads.append(pending + chunk)
    records = []
    for payload in payloads:
        record = pb.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _step(step: int, loss: float) -> StepMetrics:
    return StepMetrics(step=step, loss=loss, lm_loss=loss, mtp_loss=0.0, aux_loss=0.0, lr=1e-3,
                       bias_update_speed=1e-3, mtp_loss_weight=0.3, grad_norm=1.0, tokens=1024,
                       step_time_s=0.5, load_imbalance=1.1)


def test_wandb_offline_run_records_metrics_config_and_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    config = {"run": {"name": "t", "dir": str(run_dir)}, "storage": {"aws_secret_access_key": "S3CRET-VALUE"}}
    tracker = make_tracker(TrackingConfig(backend="wandb", project="moeforge-test"), config, rank=0)
    assert isinstance(tracker, WandbTracker) and tracker.mode == "offline"
    for step in range(1, 4):
        tracker.log(step, {"loss": 5.0 / step, "lr": 1e-3, "tokens_per_s": 100.0 * step})

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.figure(figsize=(1, 1))
    plt.plot([0, 1])
    plt.savefig(tmp_path / "timeline.png")
    plt.close()
    tracker.log_image(3, "timeline", str(tmp_path / "timeline.png"))
    tracker.finish({"final_loss": 5.0 / 3, "losses": [1, 2]})

    (wandb_file,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = read_wandb_records(wandb_file)
    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    keys = {_key(item) for h in history for item in h.item}
    assert {"loss", "lr", "tokens_per_s", "timeline/_type"} <= keys, keys
    steps = sorted({h.step.num for h in history})
    assert steps == [1, 2, 3]
    losses = [json.loads(i.value_json) for h in history for i in h.item if _key(i) == "loss"]
    assert losses == pytest.approx([5.0, 2.5, 5.0 / 3])
    config_updates = [r.run.config.update for r in records if r.WhichOneof("record_type") == "run"]
    config_updates += [r.config.update for r in records if r.WhichOneof("record_type") == "config"]
    config_items = {_key(i): json.loads(i.value_json) for update in config_updates for i in update}
    assert config_items["storage"] == {"aws_secret_access_key": "<redacted>"}
    summary = {_key(i): i.value_json for r in records if r.WhichOneof("record_type") == "summary" for i in r.summary.update}
    assert "final_loss" in summary and "losses" not in summary
    assert glob.glob(str(run_dir / "wandb" / "offline-run-*" / "files" / "media" / "images" / "timeline*.png"))
    with open(wandb_file, "rb") as f:
        assert b"S3CRET-VALUE" not in f.read()


def test_only_rank_zero_with_wandb_gets_a_run(tmp_path):
    config = {"run": {"dir": str(tmp_path / "r")}}
    assert isinstance(make_tracker(TrackingConfig(backend="wandb"), config, rank=1), NullTracker)
    assert isinstance(make_tracker(TrackingConfig(backend="none"), config, rank=0), NullTracker)
    assert isinstance(make_tracker(TrackingConfig(backend="wandb", mode="disabled"), config, rank=0), NullTracker)
    assert not (tmp_path / "r").exists()


def test_mode_is_offline_without_an_api_key(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_mode(TrackingConfig(backend="wandb")) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode(TrackingConfig(backend="wandb")) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode(TrackingConfig(backend="wandb")) == "disabled"
    assert resolve_mode(TrackingConfig(backend="wandb", mode="offline")) == "offline"


def test_console_progress_prints_every_n_steps_with_mfu():
    lines = []
    progress = ConsoleProgress(total_steps=5, every=2, log=lines.append, flops_per_token=1e6, peak_flops=1e10)
    for step in range(1, 6):
        progress.update(_step(step, 6.0 - step))
    assert [line.split("|")[0].strip() for line in lines] == ["step 2/5", "step 4/5", "step 5/5"]
    # 1024 tokens per 0.5 s = 2048 tok/s; x 1e6 FLOPs / 1e10 peak = 20.5 %
    assert "2,048 tok/s" in lines[0] and lines[0].endswith("mfu 20.5%")
    summary = TrainSummary(steps=5, first_loss=5.0, final_loss=1.0, tokens_per_s=2048.0, elapsed_s=3.0)
    assert progress.finish(summary).endswith("mfu 20.5%") and "5.0000 -> 1.0000" in lines[-1]
    plain = ConsoleProgress(total_steps=2, every=1, log=lines.append)
    assert "mfu" not in plain.update(_step(1, 1.0))


def test_wandb_files_are_uploaded_to_an_s3_run_dir(s3_server, monkeypatch):
    import boto3

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)  # the standard AWS environment names the endpoint
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="runs-wandb")
    config = {"run": {"name": "s3", "dir": "s3://runs-wandb/exp1"}}
    tracker = make_tracker(TrackingConfig(backend="wandb", project="moeforge-test"), config, rank=0)
    tracker.log(1, {"loss": 1.0})
    tracker.finish({"final_loss": 1.0})
    listed = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket="runs-wandb", Prefix="exp1/wandb/")
    keys = [o["Key"] for o in listed.get("Contents", [])]
    assert any(k.endswith(".wandb") and "/offline-run-" in k for k in keys), keys
