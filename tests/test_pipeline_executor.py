"""The pipeline executor on plain gloo process groups (spawned processes, no Ray): per-step losses,
pre-clip gradient norms, every parameter's step-1 gradient and final parameters equal the
single-process reference loop; each rank ran the simulator's action list; a hung peer ends the run
naming the rank. The comparison itself is shown to catch scale errors on all gradients and on one
small tensor.

The Ray Train path (launch_training) is covered by tests/test_placement.py (the multi-node run)."""

from __future__ import annotations

import re

import pytest
import torch
from moeforge.platform.engine.topology import Topology
from moeforge.platform.launch.local_spawn import spawn_gloo
from moeforge.platform.train.pipeline import train_from_dict
from moeforge.platform.train.single import SingleProcessEngine
from pipeline_cases import (
    GRAD_NORM_RTOL,
    PARAM_RTOL,
    assert_grad_norms_match,
    assert_losses_match,
    assert_matches_reference,
    assert_timeline_runs_schedule,
    dump_grads,
    max_relative_difference,
    pipeline_config,
    pipeline_record,
    reference_run,
)

# (schedule, pp, dp, micro-batches per replica, ZeRO stage, ranks in every shard group). The shard
# group (dp replicas x the DualPipe pair) is what ZeRO partitions over and reduces gradients in: the
# last two cases partition over 4 and 2 ranks for real.
CASES = [
    ("zb1p", 2, 1, 4, 0, 1),  # split B / W, plain optimizer step
    ("dualpipev", 2, 1, 4, 0, 1),  # 4 stages on 2 ranks, the local turn of the V
    ("1f1b", 4, 1, 4, 2, 1),  # 4 stages, tied embedding across ranks 0 and 3 (MTP), ZeRO-2 norm over pp
    ("dualpipe", 2, 2, 4, 2, 4),  # ZeRO-2 over the DualPipe pair x 2 replicas; the pair sums, dp averages
    ("zb1p", 2, 2, 4, 1, 2),  # ZeRO-1 over 2 replicas; tied embedding and DeepSpeed's norm over pp
    ("dualpipe", 4, 1, 8, 0, 2),  # each stage on two ranks, both model ends on rank 0; plain pair all-reduce
]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The reference loop's record for M * dp micro-batches (one run per count, shared by the cases)."""
    cache = {}

    def get(total_microbatches: int):
        if total_microbatches not in cache:
            raw = pipeline_config("unused", "single", 1, 1, total_microbatches, 0)
            run_dir = tmp_path_factory.mktemp(f"reference_m{total_microbatches}")
            cache[total_microbatches] = reference_run(raw, run_dir)
        return cache[total_microbatches]

    return get


@pytest.mark.parametrize("schedule, pp, dp, microbatches, zero, shard", CASES)
def test_pipeline_matches_reference(
    tmp_path, monkeypatch, references, schedule, pp, dp, microbatches, zero, shard
):
    # the groups create_process_groups builds (and ZeroStep hands DeepSpeed) have `shard` ranks each
    groups = Topology.for_schedule(schedule, pp, dp).all_groups()["shard"]
    assert {len(g) for g in groups} == {shard}, groups
    dump_grads(monkeypatch)
    run_dir = tmp_path / "run"
    raw = pipeline_config(run_dir, schedule, pp, dp, microbatches, zero)
    summary = spawn_gloo(train_from_dict, pp * dp, (raw, True))[0]
    record = pipeline_record(run_dir)
    assert summary["losses"] == record.losses
    assert_matches_reference(
        record, references(microbatches * dp), label=f"{schedule} pp={pp} dp={dp} ZeRO-{zero}"
    )
    # the measured timeline was drawn, and it is the simulator's schedule with the recorded bubble
    assert summary["timeline_png"].endswith("timeline.png")
    assert (run_dir / "timeline.png").stat().st_size > 0
    assert_timeline_runs_schedule(run_dir, schedule, pp, dp, microbatches)


class _ScaledGradients(SingleProcessEngine):
    """The one-process step with gradients multiplied by `factor` after every step's backward, before
    anything reads them (the step-1 dump, the norm, the clip): all of them (`names` None), the
    error a wrong 1/M, 1/dp or DualPipe-pair factor in a pipeline would make, or the named tensors
    only, the error of a wrong factor on one tensor's path (a balance-loss scale, a norm's)."""

    factor = 1.0
    names: tuple[str, ...] | None = None

    def forward_backward(self, batch, mtp_loss_weight=None):
        losses = super().forward_backward(batch, mtp_loss_weight)
        for name, p in self.model.named_parameters():
            if p.grad is not None and (self.names is None or name in self.names):
                p.grad.mul_(self.factor)
        return losses


@pytest.mark.parametrize("factor", [2.0, 0.5])
def test_comparison_catches_gradient_scale_error(tmp_path, references, factor):
    """A run whose gradients are all scaled by `factor` has the reference's losses (AdamW divides the
    scale out, clipping caps it); the shared comparison fails it on the gradient norm.

    x2: both runs clip to norm 1 (from 1.29 and 2.59), so they apply the same gradient up to
    rounding and the parameters stay within 4e-7: only the gradient norm shows the error. x0.5: the
    scaled norm (0.65) is not clipped where the reference's is; Adam still divides most of the scale
    out, but not for entries near eps, enough for one MTP token to pick another expert in step 2,
    whose weights (2.6e-3) and router bias then differ: a parameter comparison catches that one, by
    the luck of a routing decision."""
    scaled_loop = type(f"ScaledGradients{factor:g}", (_ScaledGradients,), {"factor": factor})
    scaled = reference_run(pipeline_config("unused", "single", 1, 1, 4, 0), tmp_path, scaled_loop)
    ref = references(4)
    # the first step's gradient is the reference's times `factor` (later steps start from other weights)
    assert scaled.grad_norms[0] == pytest.approx(factor * ref.grad_norms[0], rel=1e-6)
    # losses alone would not have caught it (nor, for x2, the parameters) ...
    assert_losses_match(scaled.losses, ref.losses)
    worst, name = max_relative_difference(scaled.params, ref.params)
    print(f"gradients x{factor:g}: losses within tolerance, parameters differ by {worst:.1e} ({name})")
    if factor == 2.0:
        assert worst <= PARAM_RTOL, (name, worst)
    # ... the shared comparison does, through the gradient norm, before it looks at parameters
    with pytest.raises(AssertionError, match="grad_norm"):
        assert_matches_reference(scaled, ref, label=f"gradients x{factor:g}")


ROUTER_GATE, NORM = "layers.1.mlp.gate.weight", "layers.1.input_layernorm.weight"


@pytest.mark.parametrize("name", [ROUTER_GATE, NORM])
@pytest.mark.parametrize("factor", [2.0, 0.5])
def test_comparison_catches_a_scale_error_on_one_small_tensor(tmp_path, references, name, factor):
    """One small tensor's gradient scaled by `factor`: its share of the squared gradient norm is
    ~2e-7 (the router gate of layer 1, 8x128) or ~3e-7 (the input norm of layer 1, 128), so the
    norm moves by 4e-7 at most, far inside its 1e-4 tolerance, and the losses match; the shared
    comparison fails on that tensor's step-1 gradient, by name."""
    scaled_loop = type("ScaledOneTensor", (_ScaledGradients,), {"factor": factor, "names": (name,)})
    scaled = reference_run(pipeline_config("unused", "single", 1, 1, 4, 0), tmp_path, scaled_loop)
    ref = references(4)
    assert torch.equal(scaled.grads[name], factor * ref.grads[name])  # the injected error, as dumped
    # the global figures do not see it ...
    assert_losses_match(scaled.losses, ref.losses)
    assert_grad_norms_match(scaled.grad_norms, ref.grad_norms)
    norm_moved = max(abs(a / b - 1) for a, b in zip(scaled.grad_norms, ref.grad_norms))
    worst, worst_name = max_relative_difference(scaled.params, ref.params)
    print(f"{name} x{factor:g}: grad norm moved {norm_moved:.1e} (tolerance {GRAD_NORM_RTOL:.0e}), "
          f"parameters {worst:.1e} ({worst_name})")
    # ... the per-tensor gradients do, and the failure names the tensor
    expected = re.escape(f"step-1 gradient of {name} differs by {abs(factor - 1):.2e} (relative)")
    with pytest.raises(AssertionError, match=expected):
        assert_matches_reference(scaled, ref, label=f"{name} x{factor:g}")


def test_hung_peer_fails_with_rank_named(tmp_path):
    """Rank 1 stops mid-step 1 and never sends; rank 0's receive times out naming rank 1."""
    raw = pipeline_config(
        tmp_path / "run",
        "1f1b",
        2,
        1,
        2,
        0,
        p2p_timeout_s=3.0,
        debug={"fault_injection": {"rank": 1, "step": 1, "kind": "hang"}},
    )
    with pytest.raises(
        RuntimeError, match=r"rank 0 .*from rank 1 did not complete within parallel.p2p_timeout_s=3s"
    ):
        spawn_gloo(train_from_dict, 2, (raw, True), timeout_s=60, failure_grace_s=1.0)  # rank 1 hangs on
