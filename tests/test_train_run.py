"""The one-process run (Trainer.single) as a complete run: checkpoints and exact resume (also after a crash), failure
records, tracking, and the bf16 / fp8 precision policies."""

from __future__ import annotations

import glob
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from moeforge.platform.checkpoint.store import list_checkpoints, read_meta
from moeforge.platform.config import TrainConfig
from moeforge.platform.config.builder import ConfigError
from moeforge.platform.data.microbatches import default_batch_source
from moeforge.platform.optim.bad_steps import BadStepError
from moeforge.platform.train.trainer import Terminated, Trainer
from test_train_loop import SMALL_MODEL


def config(run_dir, steps=6, every=2, resume=True, dropout=0.1, precision=None, **sections) -> TrainConfig:
    """The small model with attention dropout on, so the torch RNG matters to every step and an
    exact resume needs the RNG state back."""
    return TrainConfig.from_dict(
        {
            "model": {**SMALL_MODEL, "attention_dropout": dropout},
            "run": {"dir": str(run_dir), "steps": steps, "log_every": 1, "eval_every": 0},
            "data": {"global_batch": 4, "seed": 7},
            "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
            "checkpoint": {"every": every, "keep": 2, "resume": resume},
            **({"precision": precision} if precision else {}),
            **sections,
        }
    )


def trainer(cfg: TrainConfig, source=None) -> Trainer:
    return Trainer.single(cfg, source=source, log=lambda line: None)


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summary_json(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


class DyingSource:
    """The configured data, except that fetching the batch of step `dies_at` raises."""

    def __init__(self, cfg: TrainConfig, dies_at: int) -> None:
        self.inner, self.dies_at = default_batch_source(cfg), dies_at
        self.has_val = self.inner.has_val

    def batch(self, step: int) -> torch.Tensor:
        if step == self.dies_at:
            raise RuntimeError(f"data source died at step {step}")
        return self.inner.batch(step)

    def val_batch(self, i: int) -> torch.Tensor:
        return self.inner.val_batch(i)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> list[float]:
    """The uninterrupted run every resumed run must reproduce."""
    run_dir = tmp_path_factory.mktemp("straight")
    losses = trainer(config(run_dir)).train().losses
    assert [step for step, _ in list_checkpoints(str(run_dir))] == [4, 6]  # every 2, keep 2
    meta = read_meta(list_checkpoints(str(run_dir))[-1][1])
    assert (meta.step, meta.samples_consumed, meta.lr_step) == (6, 6 * 4, 6)
    return losses


def _die_in_data(t: Trainer) -> type[BaseException]:
    t.engine.source = DyingSource(t.cfg, dies_at=3)  # 3 steps done, between steps
    return RuntimeError


def _die_in_forward(t: Trainer) -> type[BaseException]:
    def interrupt(module, args):
        if t.step == 3:  # inside step 4's forward, after dropout has drawn from the RNG in earlier layers
            raise KeyboardInterrupt

    t.engine.model.layers[-1].register_forward_pre_hook(interrupt)
    return KeyboardInterrupt


def _sigterm_in_forward(t: Trainer) -> type[BaseException]:
    def terminate(module, args):
        if t.step == 2:  # a scheduler stopping the run mid-step: step 3 completes, then the run stops
            os.kill(os.getpid(), signal.SIGTERM)

    t.engine.model.layers[0].register_forward_pre_hook(terminate)
    return Terminated


def _sigterm_in_update(t: Trainer) -> type[BaseException]:
    def terminate(optimizer, args, kwargs):
        if t.step == 2:  # inside step 3's update: held until step 3 is complete and recorded
            os.kill(os.getpid(), signal.SIGTERM)

    t.engine.optimizer.register_step_pre_hook(terminate)
    return Terminated


def _stop_file_in_forward(t: Trainer) -> type[BaseException]:
    t.stop_check_s = 0.0  # look for run.dir/STOP at every step boundary

    def ask(module, args):
        if t.step == 2:  # a STOP file (what the Ray driver writes on Ctrl-C) during step 3
            (Path(t.cfg.run.dir) / "STOP").write_text("SIGINT to the driver\n")

    t.engine.model.layers[0].register_forward_pre_hook(ask)
    return Terminated


@pytest.mark.parametrize(
    "kill",
    [_die_in_data, _die_in_forward, _sigterm_in_forward, _sigterm_in_update, _stop_file_in_forward],
    ids=["data", "forward", "sigterm-forward", "sigterm-update", "stop-file"],
)
def test_killed_run_resumes_to_the_losses_of_an_uninterrupted_one(tmp_path, straight, kill):
    killed = trainer(config(tmp_path))
    error = kill(killed)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(error):
        killed.train()
    assert signal.getsignal(signal.SIGTERM) is handler  # the loop's SIGTERM handler is gone again
    # Nothing lost: the three finished steps are recorded, the failure too, and (the state being
    # consistent) a checkpoint of step 3 was written although 3 is not a multiple of every=2.
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3]
    failed = summary_json(tmp_path)
    status = "interrupted" if error in (KeyboardInterrupt, Terminated) else "failed"
    assert failed["status"] == status and failed["error"].startswith(error.__name__)
    assert failed["steps"] == 3 and failed["losses"] == straight[:3]
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [2, 3]

    assert not (tmp_path / "STOP").exists()  # a STOP file, once acted on, is gone
    if kill is _stop_file_in_forward:
        assert failed["error"] == "Terminated: SIGINT to the driver"
    resumed = trainer(config(tmp_path))
    assert resumed.step == 3
    (tmp_path / "STOP").write_text("")  # left from the run that stopped: not this run's to obey
    summary = resumed.train()
    assert summary.losses == straight  # exact: weights, AdamW moments, router biases, RNG, data
    assert summary.status == "completed" and summary.resumed_from_step == 3
    assert [r["loss"] for r in metrics(tmp_path)] == straight  # appended, not truncated
    assert summary_json(tmp_path)["status"] == "completed"


def test_failure_mid_update_writes_no_checkpoint_and_resume_drops_unsaved_steps(tmp_path, straight):
    killed = trainer(config(tmp_path))

    def fail(optimizer, args, kwargs):
        if killed.step == 3:
            raise RuntimeError("optimizer died in step 4")

    killed.engine.optimizer.register_step_pre_hook(fail)
    with pytest.raises(RuntimeError, match="optimizer died"):
        killed.train()
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [2]  # not the half-updated state
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3]
    assert summary_json(tmp_path)["status"] == "failed"

    resumed = trainer(config(tmp_path))
    assert resumed.step == 2
    assert resumed.train().losses == straight
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]  # step 3 recorded once
    assert [r["loss"] for r in metrics(tmp_path)] == straight


def test_non_finite_steps_skip_the_update_and_end_the_run_after_n_in_a_row(tmp_path):
    """NaN weights make every later step non-finite: each is skipped (no update applied, so the
    weights stay as they were), and run.max_nonfinite_steps=3 in a row end the run naming them."""
    t = trainer(config(tmp_path, every=1, dropout=0.0))
    t.engine.train_step()
    weights = {k: v.clone() for k, v in t.engine.model.state_dict().items()}
    t.engine.model.embed.weight.data[:] = float("nan")
    weights["embed.weight"] = t.engine.model.embed.weight.detach().clone()
    with pytest.raises(BadStepError, match=r"non-finite at steps 2-4 .*run\.max_nonfinite_steps=3"):
        t.train()
    assert t.step == 4  # the skipped steps consumed their batches
    for key, value in t.engine.model.state_dict().items():  # no NaN gradient was applied
        torch.testing.assert_close(value, weights[key], equal_nan=True)
    assert [r["skipped"] for r in metrics(tmp_path)] == [True, True, True]  # step 1 ran outside train()
    summary = summary_json(tmp_path)
    assert summary["error"].startswith("BadStepError") and summary["skipped_steps"] == 3


def test_fresh_run_refuses_a_run_dir_holding_checkpoints(tmp_path):
    trainer(config(tmp_path, steps=2, every=1)).train()
    with pytest.raises(ConfigError, match=r"^checkpoint.resume: false, but run.dir .* \(newest: step 2\)"):
        trainer(config(tmp_path, steps=2, every=1, resume=False))
    done = trainer(config(tmp_path, steps=2, every=1))  # resuming a finished run trains nothing
    assert done.step == 2 and done.train().steps == 2


def test_run_files_and_exported_weights_follow_the_umask(tmp_path):
    """Not owner-only: a run's record, its checkpoint files and an export are readable by others
    under the usual umask 022 (temp files and safetensors' own writer start at 0600)."""
    from moeforge.platform.checkpoint.export import export_hf

    previous = os.umask(0o022)
    try:
        trainer(config(tmp_path / "run", steps=1, every=1, dropout=0.0)).train()
        export_hf(trainer(config(tmp_path / "run", steps=1, every=1)).engine.model, tmp_path / "export")
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    files += [p for p in (tmp_path / "export").iterdir()]
    assert {"summary.json", "config.yaml", "loss.png", "model.safetensors", "meta.json"} <= {p.name for p in files}
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {"0o644"}, modes


def test_a_completed_run_is_continued_only_from_its_checkpoint(tmp_path):
    from moeforge.platform.checkpoint.resume import finished_run_note

    trainer(config(tmp_path / "a", steps=2, every=2, dropout=0.0)).train()
    assert "nothing to do (raise run.steps above 2" in finished_run_note(config(tmp_path / "a", steps=2))
    assert finished_run_note(config(tmp_path / "a", steps=3)) is None  # continues from step 2
    trainer(config(tmp_path / "b", steps=2, every=0, dropout=0.0)).train()
    assert "no checkpoint of its last step" in finished_run_note(config(tmp_path / "b", steps=2, every=0))
    with pytest.raises(ConfigError, match=r"^run.dir: .* no checkpoint of step 2 to continue from"):
        finished_run_note(config(tmp_path / "b", steps=3, every=0))


def test_a_resume_names_the_changed_keys_and_the_lr_horizon_it_follows(tmp_path):
    from moeforge.platform.optim.lr_schedule import lr_at

    trainer(config(tmp_path, steps=4, every=2, dropout=0.0)).train()
    run = {"dir": str(tmp_path), "steps": 8, "log_every": 2, "eval_every": 0}
    longer = config(tmp_path, steps=8, every=2, dropout=0.0, run=run)
    lines: list[str] = []
    Trainer.single(longer, log=lines.append)
    (note,) = [line for line in lines if line.startswith("note: the config differs")]
    assert note == (
        "note: the config differs from the one that wrote this checkpoint: run.log_every 1 -> 2, run.steps 4 -> 8"
    )
    (horizon,) = [line for line in lines if line.startswith("note: the LR schedule")]
    assert horizon == (
        f"note: the LR schedule follows run.steps=8 (the checkpoint's run had 4): step 5's LR is "
        f"{lr_at(4, longer.optim, 8):.3g}, {lr_at(4, longer.optim, 4):.3g} under the old horizon"
    )
    lines.clear()
    Trainer.single(config(tmp_path, steps=4, every=2, dropout=0.0), log=lines.append)
    assert not [line for line in lines if line.startswith("note:")]  # the same config: nothing to say


def test_settings_probably_not_meant_are_said_once_when_the_run_starts(tmp_path):
    cfg = config(
        tmp_path,
        steps=2,
        every=0,
        dropout=0.0,
        model={**SMALL_MODEL, "max_position_embeddings": 16},  # seq_len 32
        optim={"lr": 3e-3, "warmup_steps": 2},
        run={"dir": str(tmp_path), "steps": 2, "log_every": 1, "eval_every": 1},
        data={"global_batch": 4, "seed": 7, "source": "tokens", "path": str(tmp_path / "ids.bin")},
    )
    # flat token ids with no validation tail (data.val_fraction 0): every window is a training one
    ids = torch.randint(0, SMALL_MODEL["vocab_size"], (9 * 32 + 1,), dtype=torch.int16)
    ids.numpy().astype("uint16").tofile(tmp_path / "ids.bin")
    lines: list[str] = []
    Trainer.single(cfg, log=lines.append).train()
    notes = [line for line in lines if line.startswith("note: ")]
    assert notes == [
        (
            "note: optim.warmup_steps=2 is not shorter than run.steps=2: the whole run is warm-up, and the "
            "learning rate never decays"
        ),
        (
            "note: model.seq_len=32 exceeds model.max_position_embeddings=16: positions past it are longer "
            "than the model is made for"
        ),
        (
            "note: run.eval_every=1 but the data's validation split holds no sequence of model.seq_len=32 "
            "tokens: evaluation is skipped (prepare a larger validation split, or set run.eval_every=0)"
        ),
    ], notes


def test_resume_with_another_global_batch_fails_naming_it(tmp_path):
    trainer(config(tmp_path, steps=2, every=2)).train()
    cfg = config(tmp_path, steps=4, every=2, data={"global_batch": 8, "seed": 7})
    with pytest.raises(RuntimeError, match="data.global_batch=8 puts step 2 at sample 16"):
        trainer(cfg)


def test_resume_on_s3_appends_to_the_remote_metrics(s3_server, monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="train-run-resume")
    run_dir = "s3://train-run-resume/exp"
    first = trainer(config(run_dir, steps=2, every=2, dropout=0.0)).train().losses
    resumed = trainer(config(run_dir, steps=3, every=2, dropout=0.0))
    assert resumed.step == 2
    summary = resumed.train()
    body = s3.get_object(Bucket="train-run-resume", Key="exp/metrics.jsonl")["Body"].read().decode()
    records = [json.loads(line) for line in body.splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and summary.losses[:2] == first
    assert [step for step, _ in list_checkpoints(run_dir)] == [2, 3]


def test_wandb_offline_receives_every_step_and_the_summary(tmp_path, monkeypatch):
    from test_tracking import _key, read_wandb_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = config(tmp_path, steps=3, every=0, dropout=0.0, tracking={"backend": "wandb", "project": "moeforge-test"})
    summary = trainer(cfg).train()
    (wandb_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = read_wandb_records(wandb_file)
    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    losses = {h.step.num: json.loads(i.value_json) for h in history for i in h.item if _key(i) == "loss"}
    assert losses == dict(enumerate(summary.losses, start=1))
    final = {_key(i): json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "summary"
             for i in r.summary.update}
    assert final["final_loss"] == summary.final_loss and final["status"] == "completed"
    config_updates = [i for r in records if r.WhichOneof("record_type") == "run" for i in r.run.config.update]
    assert {_key(i) for i in config_updates} >= {"model", "optim", "precision"}


def test_tracking_none_writes_no_tracker_files(tmp_path):
    trainer(config(tmp_path, steps=1, every=0, dropout=0.0)).train()
    assert not (tmp_path / "wandb").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "loss.png", "metrics.jsonl", "summary.json"]


PRECISIONS = {
    "bf16": {"name": "bf16", "compute_dtype": "bfloat16", "fp8_linear": False},
    "fp8": {"name": "fp8", "compute_dtype": "bfloat16", "fp8_linear": True, "adam_moments_dtype": "bfloat16"},
}


@pytest.mark.parametrize("name", sorted(PRECISIONS))
def test_low_precision_trains_with_falling_loss(tmp_path, name):
    from moeforge.kernels.adamw_lowp import AdamWLowPrecisionMoments
    from moeforge.platform.precision import precision_report

    cfg = config(tmp_path, steps=12, every=0, dropout=0.0, precision=PRECISIONS[name])
    t = trainer(cfg)
    report = precision_report(t.engine.model)
    if name == "fp8":
        assert len(report["fp8"]) >= 10 and report["fp8_experts"] and not report["deferrable"]
        assert isinstance(t.engine.optimizer, AdamWLowPrecisionMoments) and t.engine.optimizer.moments_dtype == torch.bfloat16
    else:
        assert not report["fp8"] and report["deferrable"] and type(t.engine.optimizer) is torch.optim.AdamW
    summary = t.train()
    records = metrics(tmp_path)
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in records)
    losses = summary.losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    # Against the FP32 reference from the same init and data: close, but not bit-equal.
    ref = trainer(config(tmp_path / "fp32", steps=12, every=0, dropout=0.0)).train().losses
    assert losses == pytest.approx(ref, abs=0.05) and losses != ref
