"""The per-rank memory plan (platform/plan/memory_plan.py) and moeforge-estimate's layout section.

Parameter placement is held to what a rank really builds: `stages.build_rank` on the meta device (which
allocates nothing, so the 671B model costs only its module objects), summed over the RankModule's
parameters. Bytes per parameter and activations are arithmetic the module docstring derives; here they
are checked for consistency (ZeRO partitioning, the schedule's live activations) and through the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from moeforge.jobs.estimate import main
from moeforge.model.config import ModelConfig
from moeforge.platform.config import DataConfig, ParallelConfig, PrecisionConfig, TrainConfig
from moeforge.platform.engine.stages import build_rank, split_layers
from moeforge.platform.engine.topology import Topology
from moeforge.platform.moe.expert_placement import ExpertPlacement
from moeforge.platform.plan.accounting import model_config_from_dict
from moeforge.platform.plan.memory_plan import (
    block_activation_bytes,
    plan_memory,
)
from moeforge.platform.schedules import build_schedule
from moeforge.platform.schedules.validate import peak_live_activations

MODEL_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"
FP8 = PrecisionConfig(name="fp8", compute_dtype="bfloat16", fp8_linear=True, adam_moments_dtype="bfloat16")
PER_RANK_FIELDS = ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "total_bytes")
V3_LAYERS_PER_STAGE = [3] + [4] * 14 + [2]  # as conf/experiment/v3_671b_2048gpu.yaml


def model(name: str, **overrides) -> ModelConfig:
    values = {**yaml.safe_load((MODEL_DIR / f"{name}.yaml").read_text()), **overrides}
    return model_config_from_dict(values)


def train_config(model_cfg: ModelConfig, precision: PrecisionConfig | None = None, **parallel) -> TrainConfig:
    par = ParallelConfig(**parallel)
    return TrainConfig(
        model=model_cfg,
        parallel=par,
        precision=precision or PrecisionConfig(),
        data=DataConfig(global_batch=par.dp * par.microbatches),
    )


def built_rank_numel(cfg: TrainConfig, pp_rank: int, ep_rank: int) -> tuple[int, int, int]:
    """(parameters, routed-expert parameters, largest single tensor as a checkpoint stores it: one
    expert of a stacked [experts, ...] Parameter) of the meta-built rank at (pp_rank, ep_rank)."""
    par, m = cfg.parallel, cfg.model
    topo = Topology.for_schedule(par.schedule, par.pp, par.dp, par.ep, m.num_nextn_predict_layers > 0)
    specs = split_layers(m.num_hidden_layers, topo.num_stages, par.layers_per_stage)
    experts = ExpertPlacement(m.n_routed_experts, par.ep, ep_rank) if par.ep > 1 else None
    _, rank_module = build_rank(m, [specs[s] for s in topo.stages_of(pp_rank)], 0, "meta", experts)
    named = list(rank_module.named_parameters())  # named_parameters dedups shared Parameters
    largest = max(p[0].numel() if ".mlp.experts." in n else p.numel() for n, p in named)
    return (
        sum(p.numel() for _, p in named),
        sum(p.numel() for n, p in named if ".mlp.experts." in n),
        largest,
    )


LAYOUTS = {
    "tiny_1f1b_pp2": lambda: train_config(model("tiny"), schedule="1f1b", pp=2, microbatches=4),
    "tiny_dualpipe_pp2_dp2_ep2": lambda: train_config(
        model("tiny"), schedule="dualpipe", pp=2, dp=2, ep=2, microbatches=4
    ),
    "tiny6_dualpipe_pp4_ep4_uneven": lambda: train_config(
        model("tiny", num_hidden_layers=6),
        schedule="dualpipe",
        pp=4,
        dp=4,
        ep=4,
        microbatches=8,
        layers_per_stage=[1, 2, 2, 1],
    ),
    "tiny_dualpipev_pp2": lambda: train_config(model("tiny"), schedule="dualpipev", pp=2, microbatches=4),
    "v3_dualpipe_pp16_ep64": lambda: train_config(
        model("deepseek_v3"),
        FP8,
        schedule="dualpipe",
        pp=16,
        dp=128,
        ep=64,
        microbatches=60,
        layers_per_stage=V3_LAYERS_PER_STAGE,
    ),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_planned_parameters_equal_the_meta_built_rank(layout):
    cfg = LAYOUTS[layout]()
    plan = plan_memory(cfg)
    assert len(plan.ranks) == cfg.parallel.pp
    # V3: the two ends, a middle rank and the last (16 identical middles would only repeat the check).
    pp_ranks = [0, 1, 7, 15] if cfg.parallel.pp == 16 else range(cfg.parallel.pp)
    ep_ranks = sorted({0, cfg.parallel.ep - 1})
    for pp_rank in pp_ranks:
        planned = plan.ranks[pp_rank]
        for ep_rank in ep_ranks:
            planned_numel = (planned.params, planned.expert_params, planned.largest_tensor)
            assert built_rank_numel(cfg, pp_rank, ep_rank) == planned_numel, (
                pp_rank,
                ep_rank,
            )
        assert planned.params_bytes == 4 * planned.params  # FP32 master weights, whole (ZeRO-1)


def test_v3_layout_puts_the_ends_and_the_experts_where_the_preset_says():
    plan = plan_memory(LAYOUTS["v3_dualpipe_pp16_ep64"]())
    first, middle = plan.ranks[0], plan.ranks[1]
    assert first.stages == (0, 15) and first.layers == (0, 1, 2, 59, 60)
    assert middle.stages == (1, 14) and middle.layers == (3, 4, 5, 6, 55, 56, 57, 58)
    assert (plan.shard_group_size, plan.expert_shard_group_size) == (2 * 128, 2 * 128 // 64)
    # 4 of 256 experts of 3 x 7168 x 2048 in each of the middle rank's 8 MoE layers
    assert middle.expert_params == 8 * 4 * 3 * 7168 * 2048


def test_zero1_optimizer_bytes_shrink_with_dp():
    def plan(dp, zero_stage=1):
        return plan_memory(
            train_config(
                model("tiny"), schedule="dualpipe", pp=2, dp=dp, microbatches=4, zero_stage=zero_stage
            )
        ).ranks[0]

    by_dp = {dp: plan(dp) for dp in (1, 2, 4)}
    opt = [by_dp[dp].optimizer_bytes for dp in (1, 2, 4)]
    assert opt[0] > opt[1] > opt[2]
    # Over the DualPipe pair x dp: 12 B (FP32 master + FP32 m, v) / param / (2 dp), rounded up per share.
    for dp, r in by_dp.items():
        assert r.optimizer_bytes == pytest.approx(12 * r.params / (2 * dp), abs=12 * 2)
        assert (r.params_bytes, r.grads_bytes) == (by_dp[1].params_bytes, by_dp[1].grads_bytes)
    # ZeRO-0 keeps the moments only, whole, on the parameters themselves.
    assert plan(4, zero_stage=0).optimizer_bytes == 8 * by_dp[4].params


def test_activation_peak_follows_the_schedule():
    cfg = train_config(model("tiny"), schedule="dualpipe", pp=4, microbatches=8)
    plan = plan_memory(cfg)
    counts = peak_live_activations(build_schedule("dualpipe", 4, 8))
    for r, count in zip(plan.ranks, counts):
        assert r.peak_live_activations == count <= r.claimed_peak_activations
        assert sum(r.peak_live_by_chunk) <= count
        held = sum(n * b for n, b in zip(r.peak_live_by_chunk, r.activation_bytes_per_microbatch))
        assert r.activations_bytes == held <= count * max(r.activation_bytes_per_microbatch)
    # Twice the rows per micro-batch: twice the bytes per micro-batch, the same live count.
    doubled = plan_memory(
        TrainConfig(model=cfg.model, parallel=cfg.parallel, data=DataConfig(global_batch=16))
    ).ranks[0]
    assert cfg.data.global_batch == 8
    assert doubled.activation_bytes_per_microbatch == tuple(
        2 * b for b in plan.ranks[0].activation_bytes_per_microbatch
    )
    assert doubled.peak_live_by_chunk == plan.ranks[0].peak_live_by_chunk


def test_fp8_caches_the_routed_copies_in_e4m3_with_scales():
    v3 = model("deepseek_v3")
    bf16 = PrecisionConfig(name="bf16", compute_dtype="bfloat16")
    moe, dense = v3.first_k_dense_replace, 0
    # per routed copy: the FP8 token (7168 + 56 scales x 4 B) and the SwiGLU inputs (2 x (2048 + 16 x 4))
    fp8_routed = 8 * ((7168 + 4 * 56) + 2 * (2048 + 4 * 16))
    bf16_routed = 8 * 2 * (7168 + 2 * 2048)
    moe_fp8, moe_bf16 = block_activation_bytes(v3, FP8, moe), block_activation_bytes(v3, bf16, moe)
    shared_diff = 2 * 2 * 2048 - 2 * (2048 + 4 * 16)
    assert moe_bf16 - moe_fp8 == bf16_routed - fp8_routed + shared_diff
    assert block_activation_bytes(v3, FP8, dense) < moe_fp8


# --------------------------------------------------------------------------------------------------
# moeforge-estimate
# --------------------------------------------------------------------------------------------------
def estimate_json(capsys, *argv: str) -> dict:
    assert main([*argv, "format=json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_v3_preset_json_plan(capsys):
    report = estimate_json(capsys, "experiment=v3_671b_2048gpu")
    assert report["name"] == "deepseek_v3" and report["total_params"] > 670e9  # the estimate is kept
    per_rank, layout = report["per_rank"], report["memory_plan"]
    for field in PER_RANK_FIELDS:
        assert isinstance(per_rank[field], int) and per_rank[field] > 0, field
    assert per_rank["total_bytes"] == sum(per_rank[f] for f in PER_RANK_FIELDS[:-1])
    assert per_rank["gpu_memory_bytes"] == 80 * 10**9  # resources.gpu_memory_gb: 80, decimal GB
    assert per_rank["fits"] is (per_rank["total_bytes"] <= 80 * 10**9)
    assert per_rank["total_bytes"] == max(r["total_bytes"] for r in layout["ranks"])
    assert (layout["schedule"], layout["pp"], layout["dp"], layout["ep"]) == ("dualpipe", 16, 128, 64)
    assert (layout["microbatches"], layout["rows_per_microbatch"], layout["seq_len"]) == (120, 1, 4096)


def test_v3_preset_fits_80gb_and_two_sequences_per_microbatch_do_not(capsys):
    """The preset (120 micro-batches of 1 x 4,096 tokens per dp rank) fits an 80 GB (8e10 bytes)
    H800 by the plan. 60 micro-batches of 2 sequences (the same 15,360-sequence batch) do not: the
    17 micro-batches DualPipe keeps live on a middle rank hold 17 x 4 MoE layers x 8,192 tokens x
    164 kB = 91.6 GB of activations alone."""
    report = estimate_json(capsys, "experiment=v3_671b_2048gpu")
    per_rank = report["per_rank"]
    assert report["memory_plan"]["rows_per_microbatch"] == 1
    assert per_rank["total_bytes"] <= 80e9 and per_rank["fits"] is True
    doubled = estimate_json(capsys, "experiment=v3_671b_2048gpu", "parallel.microbatches=60")
    assert doubled["per_rank"]["activations_bytes"] > 80e9 and doubled["per_rank"]["fits"] is False


def test_v3_table_section(capsys):
    assert main(["experiment=v3_671b_2048gpu"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("model ") and "total parameters" in text  # the estimate table comes first
    for label in (
        "memory plan",
        "most loaded rank",
        "parameters",
        "gradients",
        "optimizer states",
        "activations",
        "total by pp_rank",
    ):
        assert f"\n{label}" in text or f"\n  {label}" in text, label
    assert "dualpipe, pp=16 x dp=128 (2,048 ranks), ep=64, ZeRO-1, precision fp8" in text
    assert "of 80.00 GB" in text


def test_plain_estimate_has_no_plan(capsys):
    report = estimate_json(capsys, "model=deepseek_v3")
    assert "per_rank" not in report and "memory_plan" not in report


def test_a_parallel_override_asks_for_a_plan(capsys):
    report = estimate_json(capsys, "model=tiny", "parallel=dualpipe_pp2_dp2", "parallel.ep=2")
    assert report["name"] == "tiny"
    assert report["per_rank"]["fits"] is None  # gpu_memory_gb unknown
    assert report["memory_plan"]["expert_shard_group_size"] == 2


@pytest.mark.parametrize(
    "argv, field",
    [
        (["experiment=v3_671b_2048gpu", "parallel.ep=3"], "parallel.ep"),
        (["experiment=v3_671b_2048gpu", "parallel.layers_per_stage=[4,4]"], "parallel.layers_per_stage"),
        (
            ["experiment=v3_671b_2048gpu", "parallel.microbatches=10", "data.global_batch=1280"],
            "parallel.microbatches",
        ),
        (["experiment=v3_671b_2048gpu", "format=yaml"], "format"),
    ],
)
def test_bad_layout_is_one_line_exit_2(capsys, argv, field):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moeforge-estimate: error: "), captured.err
    assert field in lines[0] and "Traceback" not in captured.err


@pytest.mark.parametrize(
    "name, seq_len, dp", [("v3_671b_extend_32k", 32768, 32), ("v3_671b_extend_128k", 131072, 8)]
)
def test_v3_extension_presets_are_planned_and_do_not_fit_80gb(capsys, name, seq_len, dp):
    """The context-extension presets plan one 32K / 128K sequence per micro-batch; without context
    parallelism a middle rank's live micro-batches need several times an 80 GB GPU (the presets say so)."""
    report = estimate_json(capsys, f"experiment={name}")
    layout, per_rank = report["memory_plan"], report["per_rank"]
    assert (layout["seq_len"], layout["rows_per_microbatch"], layout["dp"]) == (seq_len, 1, dp)
    assert per_rank["fits"] is False and per_rank["activations_bytes"] > 4 * 80e9
