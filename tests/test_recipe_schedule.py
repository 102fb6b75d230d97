"""The recipe schedules (bias update speed gamma, MTP loss weight lambda): the one function that
gives a step's values, its config and its errors, and both values taking effect in the reference
loop and in a pipeline run (which must apply the same values). V3's numbers and the presets are
checked in tests/test_experiments.py."""

from __future__ import annotations

import json

import pytest
import torch
from moeforge.platform.config import OptimConfig, TrainConfig
from moeforge.platform.config.builder import ConfigError
from moeforge.platform.optim.recipe_schedule import (
    RecipeValues,
    piecewise_value,
    recipe_after,
    recipe_at,
    tokens_before,
)
from omegaconf import OmegaConf
from pipeline_cases import pipeline_config, read_metrics, reference_run, tiny_model

SEQ, BATCH = 32, 4
TOKENS_PER_STEP = SEQ * BATCH  # 128


def tiny_config(run_dir, steps: int = 4, gamma: float = 0.05, **optim) -> TrainConfig:
    """The tiny model, 4 sequences of 32 tokens per step: 128 tokens per step."""
    return TrainConfig.from_dict(
        {
            "model": tiny_model(seq_len=SEQ, bias_update_speed=gamma, mtp_loss_weight=0.3),
            "run": {"dir": str(run_dir), "steps": steps, "log_every": 1, "eval_every": 0},
            "parallel": {"microbatches": 2},
            "data": {"global_batch": BATCH},
            "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1, **optim},
        }
    )


# --------------------------------------------------------------------------------------------------
# The function
# --------------------------------------------------------------------------------------------------
def test_piecewise_value_changes_at_each_boundary_inclusive():
    changes = [(100.0, 0.5), (300.0, 0.0)]
    assert [piecewise_value(1.0, changes, t) for t in (0, 99, 100, 299, 300, 1e9)] == [
        1.0, 1.0, 0.5, 0.5, 0.0, 0.0,
    ]  # fmt: skip
    assert piecewise_value(0.7, [], 1e15) == 0.7  # no changes: the initial value throughout


def test_recipe_at_switches_on_the_first_step_that_starts_at_the_boundary(tmp_path):
    # lambda changes from 2 steps' tokens on; gamma from 2.5 steps' tokens: a step that starts
    # below the boundary keeps the earlier value for all of its tokens
    cfg = tiny_config(
        tmp_path,
        mtp_loss_weight_schedule=[[2 * TOKENS_PER_STEP, 0.1]],
        bias_update_speed_schedule=[[2.5 * TOKENS_PER_STEP, 0.0]],
    )
    assert [tokens_before(s, cfg) for s in range(4)] == [0, 128, 256, 384]
    values = [recipe_at(s, cfg) for s in range(5)]
    assert [v.mtp_loss_weight for v in values] == [0.3, 0.3, 0.1, 0.1, 0.1]
    assert [v.bias_update_speed for v in values] == [0.05, 0.05, 0.05, 0.0, 0.0]
    # an evaluation after n steps uses the last trained step's values (the first step's before any)
    assert recipe_after(0, cfg) == recipe_after(1, cfg) == recipe_at(0, cfg)
    assert recipe_after(3, cfg) == recipe_at(2, cfg) == RecipeValues(0.05, 0.1)
    with pytest.raises(ValueError, match="step must be >= 0"):
        recipe_at(-1, cfg)


def test_without_schedules_the_model_values_hold(tmp_path):
    cfg = tiny_config(tmp_path)
    assert {recipe_at(s, cfg) for s in (0, 1, 10**9)} == {RecipeValues(0.05, 0.3)}


# --------------------------------------------------------------------------------------------------
# Config: typed, validated, errors naming the entry
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "optim, message",
    [
        (
            {"mtp_loss_weight_schedule": [[1e12, 0.1], [1e12, 0.2]]},
            r"^optim\.mtp_loss_weight_schedule\[1\]: from_tokens must exceed the previous entry's \(1e\+12\)",
        ),
        (
            {"bias_update_speed_schedule": [[0, 0.0]]},
            r"^optim\.bias_update_speed_schedule\[0\]: from_tokens must be positive",
        ),
        (
            {"mtp_loss_weight_schedule": [[1e12, -0.1]]},
            r"^optim\.mtp_loss_weight_schedule\[0\]: value must be >= 0, got -0\.1$",
        ),
        (
            {"mtp_loss_weight_schedule": [[1e12]]},
            r"^optim\.mtp_loss_weight_schedule\[0\]: expected tuple\[float, float\], got \[1000000000000\.0\]$",
        ),
        (
            {"bias_update_speed_schedule": [["10T", 0.0]]},
            r"^optim\.bias_update_speed_schedule\[0\]\[0\]: expected float, got '10T'$",
        ),
        (
            {"bias_update_speed_schedule": 0.0},
            r"^optim\.bias_update_speed_schedule: expected list\[tuple\[float, float\]\], got 0\.0$",
        ),
    ],
)
def test_schedule_errors_name_the_field(tmp_path, optim, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, **optim)


def test_schedules_are_built_as_float_pairs():
    cfg = OptimConfig(mtp_loss_weight_schedule=[[10, 1]])
    assert cfg.mtp_loss_weight_schedule == [(10.0, 1.0)] and type(cfg.mtp_loss_weight_schedule[0][0]) is float
    assert OptimConfig().bias_update_speed_schedule == [] and OptimConfig().mtp_loss_weight_schedule == []


# --------------------------------------------------------------------------------------------------
# The values take effect in training
# --------------------------------------------------------------------------------------------------
def test_reference_loop_applies_the_scheduled_lambda_and_gamma(tmp_path):
    """4 steps with both boundaries after step 2: the recorded lambda switches 0.3 -> 0.1 and the
    back-propagated loss is lm_loss + lambda * mtp_loss with it; gamma 0.05 -> 0 and the router
    biases stop moving."""
    from moeforge.platform.train.trainer import Trainer

    schedules = {
        "mtp_loss_weight_schedule": [[2 * TOKENS_PER_STEP, 0.1]],
        "bias_update_speed_schedule": [[2 * TOKENS_PER_STEP, 0.0]],
    }
    cfg = tiny_config(tmp_path / "steps", **schedules)
    engine = Trainer.single(cfg, log=lambda _line: None).engine

    def biases() -> torch.Tensor:  # [moe layers, experts]
        return torch.stack([m.gate.e_score_correction_bias.clone() for m in engine.moe_modules])

    before = biases()
    steps = []
    for _ in range(4):
        m = engine.train_step()
        after = biases()
        steps.append((m, float((after - before).abs().max())))
        before = after
    assert [m.mtp_loss_weight for m, _ in steps] == [0.3, 0.3, 0.1, 0.1]
    assert [m.bias_update_speed for m, _ in steps] == [0.05, 0.05, 0.0, 0.0]
    for m, _ in steps:
        assert m.mtp_loss > 0.1  # the MTP term is large enough for lambda to show in the loss
        assert m.loss == pytest.approx(m.lm_loss + m.mtp_loss_weight * m.mtp_loss, rel=1e-6, abs=0)
    assert steps[2][0].loss != pytest.approx(steps[2][0].lm_loss + 0.3 * steps[2][0].mtp_loss, rel=1e-3)
    # gamma: every step moves each bias by +-gamma (sign updates; the loads are never all equal) ...
    assert [moved for _, moved in steps[:2]] == pytest.approx([0.05, 0.05], rel=1e-5)
    assert [moved for _, moved in steps[2:]] == [0.0, 0.0]  # ... and none once gamma is 0

    # train() records both values in metrics.jsonl, the same run step for step, and its config.yaml
    # reads back as the same schedules
    run_cfg = tiny_config(tmp_path / "run", **schedules)
    summary = Trainer.single(run_cfg, log=lambda _line: None).train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["mtp_loss_weight"] for r in records] == [0.3, 0.3, 0.1, 0.1]
    assert [r["bias_update_speed"] for r in records] == [0.05, 0.05, 0.0, 0.0]
    assert summary.losses == [m.loss for m, _ in steps]
    saved = OmegaConf.to_container(OmegaConf.load(tmp_path / "run" / "config.yaml"))
    assert TrainConfig.from_dict(saved) == run_cfg


def test_phase_programs_weight_mtp_by_the_steps_lambda():
    """The pipeline's per-chunk compute with phase programs (parallel.chunk_phases): the lambda given
    to start_step is the one in the recorded loss (the gloo test below runs the one-graph path)."""
    from moeforge.model.config import ModelConfig
    from moeforge.platform.config.builder import build_config
    from moeforge.platform.engine.stages import MicroBatch, ModelCompute, StageChunk, build_rank, split_layers

    cfg = build_config(ModelConfig, tiny_model(seq_len=16), "model")
    (spec,) = split_layers(cfg.num_hidden_layers, 1)
    model, module = build_rank(cfg, [spec], seed=3)
    compute = ModelCompute({0: StageChunk(model, spec, module)}, loss_scale=1.0, phases=True)
    tokens = torch.randint(
        0, cfg.vocab_size, (2, cfg.seq_len + 1), generator=torch.Generator().manual_seed(0)
    )
    for weight in (None, 0.1):
        compute.start_step([MicroBatch(tokens[:, :-1], tokens[:, 1:])], mtp_loss_weight=weight)
        compute.forward(0, 0, None)
        compute.backward_full(0, 0, None)
        compute.take_grads()
        loss = {k: float(v) for k, v in compute.losses[0].items()}
        expected = cfg.mtp_loss_weight if weight is None else weight
        assert loss["loss"] == pytest.approx(loss["lm_loss"] + expected * loss["mtp_loss"], rel=1e-6)


def test_pipeline_applies_the_reference_schedule(tmp_path, monkeypatch):
    """DualPipe pp=2 on two gloo processes, lambda and gamma changing after step 1, evaluated at the
    end: the recorded values, losses, gradient norms, parameters (router biases included) and the
    evaluation's objective all equal the reference loop's."""
    from moeforge.platform.launch.local_spawn import spawn_gloo
    from moeforge.platform.train.pipeline import train_from_dict
    from pipeline_cases import assert_matches_reference, dump_grads, pipeline_record

    dump_grads(monkeypatch)
    raw = pipeline_config(tmp_path / "run", "dualpipe", 2, 1, 4, 0)
    per_step = raw["data"]["global_batch"] * raw["model"]["seq_len"]
    raw["model"]["bias_update_speed"] = 0.01
    raw["optim"]["mtp_loss_weight_schedule"] = [[per_step, 0.1]]
    raw["optim"]["bias_update_speed_schedule"] = [[per_step, 0.0]]
    raw["run"]["eval_every"] = 2
    spawn_gloo(train_from_dict, 2, (raw, True))
    ref = reference_run(raw, tmp_path / "reference")
    assert_matches_reference(pipeline_record(tmp_path / "run"), ref, label="dualpipe pp=2 with schedules")
    pipeline, reference = read_metrics(tmp_path / "run"), read_metrics(tmp_path / "reference")
    for key, expected in (("mtp_loss_weight", [0.3, 0.1]), ("bias_update_speed", [0.01, 0.0])):
        assert [r[key] for r in pipeline] == [r[key] for r in reference] == expected, key
    assert pipeline[-1]["eval_objective"] == pytest.approx(reference[-1]["eval_objective"], rel=1e-5)
