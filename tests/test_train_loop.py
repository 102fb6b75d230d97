"""The reference training loop and the optimizer-step pieces the pipeline runtime reuses."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from moeforge.platform.config import OptimConfig, TrainConfig
from moeforge.platform.config.precision import PrecisionConfig
from moeforge.platform.optim.adamw import build_adamw, clip_grads_with_norm_, global_grad_norm, grad_sq_sum
from moeforge.platform.optim.lr_schedule import lr_at

# --- LR schedule: values against hand computation ---------------------------------------------------


def _optim(**kw) -> OptimConfig:
    return OptimConfig(**{"lr": 1.0, "min_lr": 0.1, **kw})


def test_lr_warmup_is_linear_and_reaches_peak():
    cfg = _optim(warmup_steps=4, schedule="constant")
    assert [lr_at(s, cfg, 100) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_lr_cosine_midpoint_and_end():
    cfg = _optim(warmup_steps=2, schedule="cosine")
    # 11 steps: decay spans steps 2..10; step 6 is half-way: 0.1 + 0.45 * (1 + cos(pi / 2)) = 0.55.
    assert lr_at(2, cfg, 11) == pytest.approx(1.0)
    assert lr_at(6, cfg, 11) == pytest.approx(0.55)
    assert lr_at(10, cfg, 11) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg, 11) for s in range(2, 11)]
    assert all(a > b for a, b in itertools.pairwise(lrs)), lrs


def test_lr_constant_then_decay():
    cfg = _optim(warmup_steps=2, schedule="constant_decay", decay_start_fraction=0.5)
    # 20 steps: constant through step 10, cosine over 10..19; step 13 is a third of the way:
    # 0.1 + 0.45 * (1 + cos(pi / 3)) = 0.775.
    assert lr_at(0, cfg, 20) == pytest.approx(0.5)
    assert [lr_at(s, cfg, 20) for s in (2, 5, 10)] == pytest.approx([1.0, 1.0, 1.0])
    assert lr_at(13, cfg, 20) == pytest.approx(0.775)
    assert lr_at(19, cfg, 20) == pytest.approx(0.1)


def test_lr_without_warmup_starts_at_peak():
    assert lr_at(0, _optim(warmup_steps=0), 10) == pytest.approx(1.0)
    assert lr_at(9, _optim(warmup_steps=0), 10) == pytest.approx(0.1)


# --- optimizer and clipping ----------------------------------------------------------------------------


def test_weight_decay_skips_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = build_adamw(model.named_parameters(), OptimConfig(weight_decay=0.1), PrecisionConfig(name="fp32"))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert [p.shape for p in decayed["params"]] == [torch.Size([3, 4])]
    assert len(plain["params"]) == 3  # linear bias, norm weight, norm bias
    assert opt.defaults["betas"] == (0.9, 0.95)


def _params_with_grads(seed: int, scale: float) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in [(3, 5), (7,), (2, 2, 2)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * scale
    return params


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clipping_matches_torch(max_norm):
    ours, ref = _params_with_grads(0, 3.0), _params_with_grads(0, 3.0)
    norm = global_grad_norm(ours)
    assert float(grad_sq_sum(ours)) == pytest.approx(float(norm) ** 2, rel=1e-6)
    coef = clip_grads_with_norm_(ours, norm, max_norm)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    assert float(norm) == pytest.approx(float(ref_norm), rel=1e-6)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad)
    clipped = float(global_grad_norm(ours))
    if max_norm < float(norm):
        assert coef < 1.0 and clipped == pytest.approx(max_norm, rel=1e-4)
    else:
        assert coef == 1.0 and clipped == pytest.approx(float(norm), rel=1e-6)


def test_clipping_disabled_by_zero():
    params = _params_with_grads(1, 3.0)
    before = [p.grad.clone() for p in params]
    assert clip_grads_with_norm_(params, global_grad_norm(params), 0.0) == 1.0
    for p, b in zip(params, before):
        assert torch.equal(p.grad, b)


# --- the loop on a small model ---------------------------------------------------------------------------

SMALL_MODEL = {
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
    "num_hidden_layers": 2, "num_nextn_predict_layers": 1, "num_attention_heads": 2,
    "num_key_value_heads": 2, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16, "v_head_dim": 16, "n_routed_experts": 4, "n_shared_experts": 1,
    "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1,
    "max_position_embeddings": 64, "rope_scaling": None, "seq_len": 32,
}  # fmt: skip


def small_config(tmp_path, steps=3, microbatches=1, gamma=0.001, **run) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "model": {**SMALL_MODEL, "bias_update_speed": gamma},
            "run": {"dir": str(tmp_path), "steps": steps, "log_every": 1, "eval_every": 0, **run},
            "parallel": {"microbatches": microbatches},
            "data": {"global_batch": 4, "seed": 7},
            "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        }
    )


def run_losses(cfg: TrainConfig) -> list[float]:
    from moeforge.platform.train.trainer import Trainer

    return Trainer.single(cfg, log=lambda line: None).train().losses


def test_same_seed_gives_identical_losses(tmp_path):
    a = run_losses(small_config(tmp_path / "a"))
    b = run_losses(small_config(tmp_path / "b"))
    assert a == b
    c = run_losses(small_config(tmp_path / "c", seed=99))
    assert c != a  # the seed really drives initialisation


@pytest.mark.parametrize("microbatches", [2, 4])
def test_microbatching_does_not_change_the_math(tmp_path, microbatches):
    whole = run_losses(small_config(tmp_path / "m1", steps=4))
    split = run_losses(small_config(tmp_path / f"m{microbatches}", steps=4, microbatches=microbatches))
    assert split == pytest.approx(whole, abs=1e-5, rel=0)


def test_loss_falls_and_metrics_are_written(tmp_path):
    from moeforge.platform.train.trainer import Trainer

    cfg = small_config(tmp_path, steps=30, eval_every=30)
    lines: list[str] = []
    summary = Trainer.single(cfg, log=lines.append).train()
    first = sum(summary.losses[:3]) / 3
    last = sum(summary.losses[-3:]) / 3
    assert last < first - 1.0, (first, last)  # synthetic tokens: ~1.1 nats of entropy vs ln(256)=5.5
    assert summary.eval_loss is not None and summary.eval_loss < first - 1.0

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert [r["loss"] for r in records] == summary.losses
    assert records[0]["lr"] == pytest.approx(lr_at(0, cfg.optim, 30))
    assert all(math.isfinite(r["grad_norm"]) for r in records)
    for r in records:  # the worst layer's max/mean, from the same layer's two figures
        assert r["mean_expert_load"] > 0 and r["load_imbalance"] == r["max_expert_load"] / r["mean_expert_load"]
    # eval_loss is held-out LM cross-entropy (what perplexity is of); the objective adds λ·MTP
    last = records[-1]
    assert last["eval_loss"] == summary.eval_loss and last["eval_ppl"] == math.exp(last["eval_loss"])
    assert last["eval_objective"] > last["eval_loss"] and summary.eval_ppl == last["eval_ppl"]
    assert sum(line.startswith("step ") for line in lines) == 30
    assert "tok/s" in lines[1] and "expert load max/mean" in lines[1] and "eta" in lines[1]
    saved = TrainConfig.from_dict(_yaml(tmp_path / "config.yaml"))
    assert saved == cfg  # the written config reads back as the same validated TrainConfig


def _yaml(path):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path))


@pytest.mark.parametrize("gamma", [0.0, 0.05])
def test_router_bias_update(tmp_path, gamma):
    from moeforge.platform.train.trainer import Trainer

    engine = Trainer.single(small_config(tmp_path, gamma=gamma), log=lambda line: None).engine
    gates = [m.gate.e_score_correction_bias for m in engine.moe_modules]
    assert gates, "the small model has MoE layers"
    before = [b.clone() for b in gates]
    batch = engine.source.batch(0)
    # The loads this step will see: one forward of the same batch with the same (pre-step) weights.
    with torch.no_grad():
        engine.model(batch[:, :-1], labels=batch[:, 1:])  # labels: the MTP block routes too
    counts = [m.load_counts.clone() for m in engine.moe_modules]
    for m in engine.moe_modules:
        m.reset_load()
    assert sum(float(c.sum()) for c in counts) > 0

    engine.train_step(batch=batch)
    for moe in engine.moe_modules:
        assert float(moe.load_counts.sum()) == 0.0  # counters reset for the next step
    for b0, b1, c in zip(before, gates, counts):
        if gamma == 0:
            assert torch.equal(b0, b1)
        else:  # overloaded experts go down by gamma, underloaded ones up
            torch.testing.assert_close(b1 - b0, gamma * torch.sign(c.mean() - c))
            assert not torch.equal(b0, b1)


def test_run_records_go_to_an_s3_run_dir(s3_server, monkeypatch):
    import boto3
    from moeforge.platform.train.trainer import Trainer

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)  # how a user points boto3 at an S3-compatible store
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="train-loop-runs")
    cfg = small_config("s3://train-loop-runs/exp1", steps=2)
    summary = Trainer.single(cfg, log=lambda line: None).train()

    def read(key: str) -> str:
        return s3.get_object(Bucket="train-loop-runs", Key=f"exp1/{key}")["Body"].read().decode()

    assert [json.loads(line)["loss"] for line in read("metrics.jsonl").splitlines()] == summary.losses
    assert json.loads(read("summary.json"))["steps"] == 2
    assert "hidden_size: 64" in read("config.yaml")


def test_resume_from_state_dict_continues_the_same_run(tmp_path):
    from moeforge.platform.train.trainer import Trainer

    straight = run_losses(small_config(tmp_path / "straight", steps=4))
    first = Trainer.single(small_config(tmp_path / "a", steps=4), log=lambda line: None)
    for _ in range(2):
        first.engine.train_step()
    state = first.engine.state_dict()
    resumed = Trainer.single(small_config(tmp_path / "b", steps=4, seed=5), log=lambda line: None)
    resumed.engine.load_state_dict(state)  # a different init seed: everything must come from the state
    assert resumed.train().losses == straight[2:]
