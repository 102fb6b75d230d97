"""Expert-parallel training runs against the single-process reference loop (same seeds and data).

Gloo processes (platform/launch/local_spawn.spawn_gloo); the Ray Train case (DualPipe pp=2 x dp=2
x ep=2 with ZeRO-1) is in test_placement.py's multi-node run. Each rank builds only its slice of
the experts and its MoE layers dispatch and combine over real all-to-alls; the comparison is the
one every pipeline case goes through (pipeline_cases.assert_matches_reference: losses <= 1e-5,
pre-clip gradient norms <= 1e-4, every step-1 gradient, the routed experts' assembled from the EP
ranks' rows, and every parameter within their bounds, fp32 payloads)."""

from __future__ import annotations

import copy
import importlib.resources

import pytest
import torch
import yaml
from moeforge.kernels.token_compress import compress_tokens, decompress_tokens
from moeforge.platform.config import TrainConfig
from moeforge.platform.engine.comm_record import RECORD_ENV
from moeforge.platform.engine.nccl_rules import load_records, violations
from moeforge.platform.launch.local_spawn import spawn_gloo
from moeforge.platform.train.pipeline import run_pipeline_training, train_from_dict
from moeforge.platform.train.single import SingleProcessEngine
from moeforge.platform.train.trainer import Trainer
from pipeline_cases import (
    assert_matches_reference,
    dump_grads,
    pipeline_config,
    pipeline_record,
    read_metrics,
    reference_run,
    relative_differences,
    run_record,
)

TOPK_GROUP = 1  # tiny: 8 experts in 2 groups, 1 group kept per token


@pytest.mark.parametrize(
    "schedule, pp, dp, ep, microbatches, ranks_per_node, zero_stage",
    [
        ("1f1b", 1, 2, 2, 2, 1, 0),  # one stage, two EP ranks on two (pretend) nodes, plain all-reduce step
        ("1f1b", 1, 4, 4, 2, 2, 1),  # four EP ranks, two per node; ZeRO-1 through DeepSpeed's MoE groups
        # DualPipe pairs x dp replicas x EP on one node with the plain step: the expert all-reduce
        # over 2 ranks (the ZeRO-1 form of this layout is test_placement.py's multi-node Ray Train case)
        ("dualpipe", 2, 2, 2, 4, 0, 0),
    ],
)
def test_expert_parallel_run_matches_reference(
    tmp_path, monkeypatch, schedule, pp, dp, ep, microbatches, ranks_per_node, zero_stage
):
    dump_grads(monkeypatch)
    monkeypatch.setenv(RECORD_ENV, str(tmp_path / "comm"))  # what the ranks post, held to NCCL's rules
    raw = pipeline_config(
        tmp_path / "run", schedule, pp, dp, microbatches, zero_stage, ep=ep, ep_ranks_per_node=ranks_per_node
    )
    summary = spawn_gloo(train_from_dict, pp * dp, (raw, True))[0]
    per_rank = load_records(str(tmp_path / "comm"))
    assert sorted(per_rank) == list(range(pp * dp))
    found = violations(per_rank)
    assert not found, "\n".join(found[:8])
    record = pipeline_record(tmp_path / "run")
    assert summary["losses"] == record.losses
    label = f"{schedule} pp={pp} dp={dp} ep={ep} ZeRO-{zero_stage}"
    assert_matches_reference(record, reference_run(raw, tmp_path / "reference"), label=label)
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


class _DispatchRounding(torch.autograd.Function):
    """The FP8 dispatch's effect on the rows it carries, without the all-to-all: forward
    decompress(compress(x)) in x's dtype (kernels/token_compress.py, the functions
    dispatch.dispatch_rows_fp8 calls), backward the gradient unchanged (the dispatch
    sends gradients back unquantised)."""

    @staticmethod
    def forward(ctx, x):
        return decompress_tokens(*compress_tokens(x), x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


class FP8DispatchedReference(SingleProcessEngine):
    """The one-process loop whose routed experts receive their input rows as the FP8 dispatch
    delivers them: every row rounded to e4m3 with its 1x128 power-of-two tile scales."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for moe in self.model.moe_layers():
            moe.experts.register_forward_pre_hook(
                lambda _module, args: (_DispatchRounding.apply(args[0]), *args[1:])
            )


def test_fp8_dispatch_matches_the_loop_with_dispatch_rounding(tmp_path):
    """precision=fp8 dispatches e4m3 tiles, which one process never does; all else is the same FP8
    recipe. The reference rounds each routed-expert input row with the dispatch's own quantizer.

    Measured (relative): step 1 loss 0, grad norm 1.8e-7 to 2.8e-7; step 2 loss 4e-7 to 1.9e-6, grad
    norm 1.4e-6 on one machine and 1.0e-4 to 1.4e-4 on another (AMD EPYC, with torch's AVX-512 and
    AVX2 kernels alike). The forward of step 1 is bit-identical. What differs is the experts' FP8
    weight gradient: its 1x128 tiles run along each expert's tokens, and an EP rank's grouped GEMM
    holds the rows of both dp replicas' micro-batches in one segment, where the loop quantizes each
    micro-batch's rows alone; the tile scales differ, so the expert gradients differ by e4m3 rounding
    (up to 2^-4 of a value), and step 2 starts from other weights. How far apart step 2 lands depends
    on which entries that rounding moves across AdamW's eps, which the last bits of the FP32 sums
    decide: hence step 2's looser bound. With the preset's power-of-two scales the experts quantize
    their input rows with the dispatch's own ue8m0 tiles, so the reference's rounding is the identity
    there (measured: the plain loop gives the same figures); it is what makes the comparison exact
    under any scale format."""
    raw = pipeline_config(tmp_path / "run", "1f1b", 1, 2, 2, 0, ep=2)
    raw["precision"] = _precision("fp8")
    spawn_gloo(train_from_dict, 2, (raw, True))
    record = pipeline_record(tmp_path / "run")
    reference = reference_run(raw, tmp_path / "reference", FP8DispatchedReference)
    losses = relative_differences(record.losses, reference.losses)
    norms = relative_differences(record.grad_norms, reference.grad_norms)
    print(f"FP8 dispatch vs the loop with its rounding: loss {losses}, grad_norm {norms}")
    assert losses[0] <= 1e-6 and norms[0] <= 1e-6, (losses, norms)  # the same first step
    assert losses[1] <= 1e-5 and norms[1] <= 1e-3, (losses, norms)  # after one step of other expert gradients
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


def test_skewed_routing_keeps_parity(tmp_path, monkeypatch):
    dump_grads(monkeypatch)  # both runs below write their step-1 gradients
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
        trainer = Trainer.single(cfg, log=lambda _line: None, source=_skewed_source(cfg))
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    reference = run_record(
        tmp_path / "reference", {k: v.detach().clone() for k, v in trainer.engine.model.state_dict().items()}
    )
    assert_matches_reference(record, reference, label="skewed routing dp=2 ep=2")
    shares = [step["ep_recv_max_over_mean"] for step in read_metrics(tmp_path / "run")]
    print(f"skewed routing: busiest EP rank's rows / mean, per step: {shares}")
    for step in read_metrics(tmp_path / "run"):
        # the busiest EP rank received well over the mean: with 2 ranks, 1.5 means 3/4 of the rows
        assert step["ep_recv_max_over_mean"] >= 1.5, step["ep_recv_max_over_mean"]
