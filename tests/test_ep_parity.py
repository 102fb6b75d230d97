"""Expert-parallel training runs against the single-process reference loop (same seeds and data).

Gloo processes (platform/runtime/local_spawn.spawn_gloo); the Ray Train cases (DualPipe pp=2 x dp=2
x ep=2, with and without ZeRO-1) are in test_pipeline_ray.py. Each rank builds only its slice of
the experts and its MoE layers dispatch and combine over real all-to-alls; the comparison is the
one every pipeline case goes through (pipeline_cases.assert_matches_reference: losses <= 1e-5,
pre-clip gradient norms <= 1e-4, every parameter <= 1e-5, fp32 payloads)."""

from __future__ import annotations

import copy
import importlib.resources

import pytest
import torch
import yaml
from moeforge.platform.config import TrainConfig
from moeforge.platform.reference.loop import ReferenceTrainer
from moeforge.platform.runtime.local_spawn import spawn_gloo
from moeforge.platform.runtime.pipeline_run import run_pipeline_training, train_from_dict
from pipeline_cases import (
    assert_matches_reference,
    pipeline_config,
    pipeline_record,
    read_metrics,
    reference_run,
    run_record,
)

TOPK_GROUP = 1  # tiny: 8 experts in 2 groups, 1 group kept per token


@pytest.mark.parametrize(
    "dp, ep, ranks_per_node, zero_stage",
    [
        (2, 2, 1, 0),  # one stage, two EP ranks on two (pretend) nodes, plain all-reduce step
        (4, 4, 2, 1),  # four EP ranks, two per node; ZeRO-1 through DeepSpeed's MoE parameter groups
    ],
)
def test_expert_parallel_run_matches_reference(tmp_path, dp, ep, ranks_per_node, zero_stage):
    raw = pipeline_config(
        tmp_path / "run", "1f1b", 1, dp, 2, zero_stage, ep=ep, ep_ranks_per_node=ranks_per_node
    )
    summary = spawn_gloo(train_from_dict, dp, (raw, True))[0]
    record = pipeline_record(tmp_path / "run")
    assert summary["losses"] == record.losses
    assert_matches_reference(
        record, reference_run(raw, tmp_path / "reference"), label=f"dp={dp} ep={ep} ZeRO-{zero_stage}"
    )
    for step in read_metrics(tmp_path / "run"):
        # node-limited routing: the router's 2 expert groups are the 2 nodes' experts, so a token
        # reaches at most topk_group nodes; it reaches at least one rank, at most k = 2
        assert step["ep_nodes_per_token_max"] <= TOPK_GROUP
        assert 1.0 <= step["ep_ranks_per_token_mean"] <= step["ep_ranks_per_token_max"] <= 2
        assert step["ep_dispatch_bytes"] > 0 and step["ep_combine_bytes"] == step["ep_dispatch_bytes"]


def _precision(name: str) -> dict:
    return yaml.safe_load(
        importlib.resources.files("moeforge.conf").joinpath(f"precision/{name}.yaml").read_text()
    )


def _first_order_rounding_bound(raw: dict) -> tuple[float, float]:
    """(first step's loss, first-order worst-case change of it) when every routed-expert input
    value x is perturbed by at most U |x|: U * sum over every expert-input entry of |x * dL/dx|.

    Measured on the reference model at initialisation (the weights the first step of both runs
    share), on the first step's batch, with the micro-batch split the reference uses."""
    ref_raw = copy.deepcopy(raw)
    ref_raw["parallel"] = {
        "schedule": "single",
        "microbatches": raw["parallel"]["microbatches"] * raw["parallel"]["dp"],
    }
    trainer = ReferenceTrainer(TrainConfig.from_dict(ref_raw), log=lambda _line: None)
    inputs: list[torch.Tensor] = []

    def keep_input(_module, args):
        args[0].retain_grad()
        inputs.append(args[0])

    hooks = [moe.experts.register_forward_pre_hook(keep_input) for moe in trainer.model.moe_layers()]
    try:
        losses = trainer.forward_backward(trainer.source.batch(0))
    finally:
        for hook in hooks:
            hook.remove()
    bound = E4M3_ROUNDING * sum(float((x.detach() * x.grad).abs().sum()) for x in inputs)
    return losses["loss"], bound


# e4m3 rounds a normal value to within half an ulp, 2^-4 of itself (3 mantissa bits); with the power-
# of-two tile scale, subnormals err by far less (tests/test_expert_parallel.py checks both)
E4M3_ROUNDING = 2**-4


def test_fp8_dispatch_stays_within_the_e4m3_rounding_bound(tmp_path):
    """precision=fp8 dispatches e4m3 tiles, which one process never does; all else is the same
    FP8 recipe. The dispatch replaces each routed-expert input value x by x(1 + d), |d| <= 2^-4,
    so to first order the first step's loss (same weights in both runs) moves by at most
    2^-4 * sum |x * dL/dx| over all expert inputs: the bound, measured on the reference. Later
    steps compound the difference through the optimizer; they are held to the same bound relative
    to its first-step size, ten times over."""
    steps = 3
    raw = pipeline_config(tmp_path / "run", "1f1b", 1, 2, 2, 0, ep=2)
    raw["run"]["steps"] = steps
    raw["precision"] = _precision("fp8")
    spawn_gloo(train_from_dict, 2, (raw, True))
    record = pipeline_record(tmp_path / "run")
    reference = reference_run(raw, tmp_path / "reference")
    first_loss, bound = _first_order_rounding_bound(raw)
    assert first_loss == pytest.approx(reference.losses[0], rel=1e-9)  # the same first step
    errors = [abs(a - b) for a, b in zip(record.losses, reference.losses, strict=True)]
    print(f"FP8 dispatch: loss change per step {errors}; first-order e4m3 bound {bound:.2e}")
    # With power-of-two scales (the fp8 preset) the experts quantize their input rows with the
    # dispatch's own ue8m0 tiles, so re-quantizing the dispatched values reproduces them exactly
    # and step 1 may not move at all; what remains is the order of the BF16 combine sums.
    assert 0 <= errors[0] <= bound, f"step 1: the FP8 dispatch moved the loss by {errors[0]:.2e} > {bound:.2e}"
    for step, error in enumerate(errors[1:], start=2):
        assert error <= 10 * bound, f"step {step}: loss moved by {error:.2e} > 10 x the step-1 bound"
    first = read_metrics(tmp_path / "run")[0]
    # e4m3 bytes plus one scale byte per 128 values, against BF16 combine rows: 129 / 256
    assert first["ep_dispatch_bytes"] / first["ep_combine_bytes"] == pytest.approx(129 / 256)


class SkewedTokens:
    """Batches in which 7 of every 8 rows repeat one token id. Every position of such a row has the
    same hidden state at every MoE layer (position-wise MLPs; attention over identical values
    returns that value whatever its weights), so their tokens all pick the same experts: one EP rank
    receives most of the step's rows. Rows are cut per dp replica as the default source cuts them
    (contiguous blocks), and the reference reads the whole batch."""

    has_val = False

    def __init__(self, global_batch: int, seq_len: int, vocab_size: int) -> None:
        self.global_batch, self.seq_len, self.vocab_size = global_batch, seq_len, vocab_size

    def batch(self, step: int, dp_rank: int = 0, dp_size: int = 1) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1000 + step)
        rows = torch.randint(0, self.vocab_size, (self.global_batch, self.seq_len + 1), generator=gen)
        rows[torch.arange(self.global_batch) % 8 != 0] = 7  # [global_batch, seq_len + 1]
        per_replica = self.global_batch // dp_size
        return rows[dp_rank * per_replica : (dp_rank + 1) * per_replica]


def _skewed_source(cfg: TrainConfig) -> SkewedTokens:
    return SkewedTokens(cfg.data.global_batch, cfg.model.seq_len, cfg.model.vocab_size)


def _train_on_skewed_tokens(rank: int, world_size: int, raw: dict):
    cfg = TrainConfig.from_dict(raw)
    return run_pipeline_training(cfg, rank, world_size, log=lambda _line: None, source=_skewed_source(cfg))


def test_skewed_routing_keeps_parity(tmp_path):
    raw = pipeline_config(tmp_path / "run", "1f1b", 1, 2, 2, 0, ep=2)
    raw["data"]["global_batch"] = 16
    spawn_gloo(_train_on_skewed_tokens, 2, (raw,))
    record = pipeline_record(tmp_path / "run")
    ref_raw = copy.deepcopy(raw)
    ref_raw["parallel"] = {"schedule": "single", "microbatches": 4}
    ref_raw["run"]["dir"] = str(tmp_path / "reference")
    cfg = TrainConfig.from_dict(ref_raw)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each gloo worker
    try:
        trainer = ReferenceTrainer(cfg, log=lambda _line: None, source=_skewed_source(cfg))
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    reference = run_record(
        tmp_path / "reference", {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    )
    assert_matches_reference(record, reference, label="skewed routing dp=2 ep=2")
    shares = [step["ep_recv_max_over_mean"] for step in read_metrics(tmp_path / "run")]
    print(f"skewed routing: busiest EP rank's rows / mean, per step: {shares}")
    for step in read_metrics(tmp_path / "run"):
        # the busiest EP rank received well over the mean: with 2 ranks, 1.5 means 3/4 of the rows
        assert step["ep_recv_max_over_mean"] >= 1.5, step["ep_recv_max_over_mean"]
