"""The peer row of moeforge-bench overlap: torch's `ScheduleDualPipeV` on the same synthetic chunks.

Each of a rank's two V stages is a module whose forward runs the chunk's phases (`overlap_phases.PhaseShape`)
as autograd functions: a phase sleeps its forward time and, in backward, the input-gradient part
of its backward time; an all-to-all moves the same payload over the same EP group, blocking, both
ways. The weight-gradient part is torch's own deferred W: the stage's `dw_builder` sleeps it, so
torch's F / I / W actions and its OVERLAP_F_B (which runs the forward, then the full backward, one
after the other) cost what ours do.

Each stage adds a scalar `anchor` parameter to its input: a pipeline input does not require a
gradient, and without a parameter ahead of the phases the first stage's backward would have nothing
to run.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from moeforge.platform.bench.overlap_phases import PhaseShape
from moeforge.platform.moe.dispatch import launch_all_to_all
from torch import nn


class _Phase(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forward_s, backward_s):
        time.sleep(forward_s)
        ctx.backward_s = backward_s
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.backward_s)
        return grad, None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, payload, splits, group):
        launch_all_to_all(payload, splits, splits, group).wait()  # blocking, as torch's stage runs it
        ctx.payload, ctx.splits, ctx.group = payload, splits, group
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        launch_all_to_all(ctx.payload, ctx.splits, ctx.splits, ctx.group).wait()
        return grad, None, None, None


class SyntheticStage(nn.Module):
    """One V stage: the chunk's phases and all-to-alls, with costs from `shape`."""

    def __init__(self, shape: PhaseShape, ep_group, ep_size: int) -> None:
        super().__init__()
        self.shape, self.ep_group = shape, ep_group
        self.payload, self.splits = shape.payload(ep_size)
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        forward = self.shape.forward_phases()
        backward = list(reversed(self.shape.backward_phases()))  # in forward order
        h = x + self.anchor
        for k, (f_s, b_s) in enumerate(zip(forward, backward, strict=True)):
            h = _Phase.apply(h, f_s, b_s)
            if k < len(forward) - 1:
                h = _AllToAll.apply(h, self.payload, self.splits, self.ep_group)
        return h


def torch_dualpipev_steps(
    pp_rank: int,
    pp: int,
    pp_group,
    ep_group,
    ep_size: int,
    shape: PhaseShape,
    microbatches: int,
    act_shape: tuple[int, ...],
    steps: int,
) -> list[float]:
    """Run `steps` steps of torch's ScheduleDualPipeV on this rank; each step's wall time (seconds,
    from a barrier over the world to the end of this rank's step)."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import ScheduleDualPipeV

    num_stages = 2 * pp
    example = torch.zeros(act_shape, requires_grad=True)  # received activations need their gradient
    stages = [
        PipelineStage(
            SyntheticStage(shape, ep_group, ep_size),
            stage_index=index,
            num_stages=num_stages,
            device=torch.device("cpu"),
            input_args=(example,),
            output_args=(example,),
            group=pp_group,
            dw_builder=lambda: lambda: time.sleep(shape.w_s),
        )
        for index in (pp_rank, num_stages - 1 - pp_rank)
    ]
    schedule = ScheduleDualPipeV(stages, n_microbatches=microbatches, loss_fn=lambda out, _target: out.sum())
    batch = torch.zeros((microbatches * act_shape[0], *act_shape[1:]))  # split into micro-batches on dim 0
    times = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        if pp_rank == 0:  # the V's first and last stage: the input and the loss
            schedule.step(batch, target=batch)
        else:
            schedule.step()
        times.append(time.perf_counter() - start)
    return times
