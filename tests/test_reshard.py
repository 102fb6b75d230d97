"""A checkpoint resumes in another parallel layout: the step after it equals the never-resharded run.

Each case writes a checkpoint after step 1 in one layout and resumes it for step 2 in another. The
never-resharded run is the single-process reference loop trained straight through 2 steps (every
pipeline layout matches it within the pipeline tests' tolerances: tests/pipeline_cases.py), so the
comparison is the same one every pipeline test makes: per-step losses and pre-clip gradient norms,
and the final parameters by name. Step 1 comes from the writing layout, step 2 from the reading one.

Cases (the issue's list): pipeline ep=2 dp=2 ZeRO-1 DualPipe into the single-process loop (ep 2->1,
dp 2->1, ZeRO partitions -> one AdamW), the single-process loop into that layout (the reverse), and
DualPipe pp=2 into 1F1B pp=4 (pp 2->4, DualPipe pairs -> one copy per stage, plain step).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil

import pytest
import torch
from moeforge.platform.checkpoint.reshard import CheckpointReader, load_model_from_checkpoint
from moeforge.platform.checkpoint.state import CheckpointError
from moeforge.platform.checkpoint.store import list_checkpoints, read_meta
from moeforge.platform.config import TrainConfig
from moeforge.platform.launch.local_spawn import spawn_gloo
from moeforge.platform.train.pipeline import train_from_dict
from moeforge.platform.train.trainer import Trainer
from pipeline_cases import (
    assert_matches_reference,
    dump_grads,
    pipeline_config,
    pipeline_record,
    reference_run,
    run_record,
)

EP_LAYOUT = ("dualpipe", 2, 2, 2, 4, 1)  # schedule, pp, dp, ep, micro-batches per replica, ZeRO stage


def _pipeline_raw(run_dir, layout, steps: int) -> dict:
    schedule, pp, dp, ep, microbatches, zero_stage = layout
    raw = pipeline_config(run_dir, schedule, pp, dp, microbatches, zero_stage=zero_stage, ep=ep)
    raw["run"]["steps"] = steps
    raw["tracking"] = {"log_timeline": False}
    raw["checkpoint"] = {"every": 1, "keep": 5, "resume": True}
    return raw


def _single_raw(pipeline_raw: dict, run_dir, steps: int) -> dict:
    raw = copy.deepcopy(pipeline_raw)
    par = raw["parallel"]
    raw["parallel"] = {"schedule": "single", "microbatches": par["microbatches"] * par.get("dp", 1)}
    raw["run"].update(dir=str(run_dir), steps=steps)
    return raw


def _continue_in(src, dst) -> None:
    """dst starts as src's run.dir after its step-1 checkpoint (its metrics.jsonl says step 1)."""
    shutil.copytree(src, dst)
    for name in ("summary.json", "params"):
        path = os.path.join(dst, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _run_single(raw: dict) -> Trainer:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each pipeline worker (see pipeline_cases.reference_run)
    try:
        trainer = Trainer.single(TrainConfig.from_dict(raw), log=lambda _line: None)
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    return trainer


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The never-resharded run: the reference loop, 2 steps."""
    root = tmp_path_factory.mktemp("straight")
    raw = _pipeline_raw(root / "run", EP_LAYOUT, steps=2)
    raw["checkpoint"] = {"every": 0}
    return reference_run(raw, root / "reference")


def test_ep2_dp2_zero_pipeline_into_single_process_loop(tmp_path, monkeypatch, straight):
    dump_grads(monkeypatch)  # the first step's run writes them; the resumed one carries them on
    src = tmp_path / "pipeline"
    spawn_gloo(train_from_dict, 4, (_pipeline_raw(src, EP_LAYOUT, steps=1), True))
    meta = read_meta(list_checkpoints(str(src))[-1][1])
    assert meta.world == {"pp": 2, "dp": 2, "ep": 2}
    # each EP rank wrote its rows of the stacked experts, ZeRO ranks their runs of the moments
    experts = [
        info
        for shard in meta.shards.values()
        for key, info in shard["tensors"].items()
        if key.startswith("model/") and key.endswith("experts.gate_proj")
    ]
    assert experts and all(info["shape"][0] * 2 == info["global_shape"][0] for info in experts)

    dst = tmp_path / "single"
    _continue_in(src, dst)
    logs: list[str] = []
    raw = _single_raw(_pipeline_raw(dst, EP_LAYOUT, steps=2), dst, steps=2)
    trainer = Trainer.single(TrainConfig.from_dict(raw), log=logs.append)
    assert trainer.step == 1 and any(line.startswith("resharded:") for line in logs), logs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference run (pipeline_cases.reference_run)
    try:
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    record = run_record(dst, {k: v.detach().clone() for k, v in trainer.engine.model.state_dict().items()})
    assert_matches_reference(record, straight, label="ep=2 dp=2 ZeRO-1 DualPipe -> single")


def test_single_process_loop_into_ep2_dp2_zero_pipeline(tmp_path, monkeypatch, straight):
    dump_grads(monkeypatch)
    src = tmp_path / "single"
    pipeline_raw = _pipeline_raw(tmp_path / "pipeline", EP_LAYOUT, steps=2)
    _run_single(_single_raw(pipeline_raw, src, steps=1))
    dst = tmp_path / "pipeline"
    _continue_in(src, dst)
    summary = spawn_gloo(train_from_dict, 4, (pipeline_raw, True))[0]
    assert summary["resumed_from_step"] == 1
    assert_matches_reference(pipeline_record(dst), straight, label="single -> ep=2 dp=2 ZeRO-1 DualPipe")


def test_dualpipe_pp2_into_1f1b_pp4(tmp_path, monkeypatch, straight):
    dump_grads(monkeypatch)
    src = tmp_path / "dualpipe"
    spawn_gloo(train_from_dict, 2, (_pipeline_raw(src, ("dualpipe", 2, 1, 1, 4, 0), steps=1), True))
    dst = tmp_path / "1f1b"
    _continue_in(src, dst)
    summary = spawn_gloo(train_from_dict, 4, (_pipeline_raw(dst, ("1f1b", 4, 1, 1, 4, 0), steps=2), True))[0]
    assert summary["resumed_from_step"] == 1
    assert_matches_reference(pipeline_record(dst), straight, label="DualPipe pp=2 -> 1F1B pp=4")
    # the whole model reads back from the pp=4 checkpoint as it trained (export, debugging)
    model = load_model_from_checkpoint(list_checkpoints(str(dst))[-1][1])
    for name, value in pipeline_record(dst).params.items():
        assert torch.equal(model.state_dict()[name], value), name


def test_reader_names_a_gap_and_a_shape_mismatch(tmp_path):
    """A checkpoint missing a shard's elements, or a model of another size, fails naming the key."""
    run = tmp_path / "run"
    raw = _single_raw(_pipeline_raw(run, EP_LAYOUT, steps=1), run, steps=1)
    _run_single(raw)
    path = list_checkpoints(str(run))[-1][1]
    with CheckpointReader(path) as reader:
        key = "model/embed.weight"
        n = reader.read(key).numel()
        assert torch.equal(reader.read(key, 5, 17), reader.read(key)[5:17])
        with pytest.raises(CheckpointError, match="outside"):
            reader.read(key, 0, n + 1)
        # as if the shard holding the second half were lost: keep only a piece of the first half
        whole = reader.pieces[key][0]
        reader.pieces[key] = [dataclasses.replace(whole, numel=n // 2)]
        with pytest.raises(CheckpointError, match=rf"model/embed\.weight: no shard holds element {n // 2}"):
            reader.read(key)
    bigger = copy.deepcopy(raw)
    bigger["model"]["hidden_size"] = 64
    bigger["checkpoint"]["resume"] = True
    bigger["run"]["steps"] = 2
    with pytest.raises(
        CheckpointError, match=r"model/embed\.weight: checkpoint shape \[4096, 128\] != model shape"
    ):
        Trainer.single(TrainConfig.from_dict(bigger), log=lambda _line: None)
