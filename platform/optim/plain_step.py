"""The optimizer step of a pipeline rank without ZeRO (parallel.zero_stage 0).

One flat all-reduce of the rank's gradients over its shard group (dp replicas x the DualPipe pair;
multiplied by `param_copies / shard` so a DualPipe pair sums and dp replicas average, as
the `platform.optim.zero_step` module docstring explains), the reference's sum of squares all-reduced
over the norm group, the reference's clip, then AdamW from `build_adamw`. With expert parallelism the
routed-expert gradients are reduced over the expert shard group instead (the replicas holding the same
experts), and their squared norm is summed over the EP group (which holds the other experts of the same
layers) before the norm group adds up the stages. Same interface as `ZeroStep`:
`step(grads, lr) -> grad_norm` (consuming `grads`) and `state()` for checkpoints.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from moeforge.platform.checkpoint.state import OptimizerState
from moeforge.platform.config.optim import OptimConfig
from moeforge.platform.config.precision import PrecisionConfig
from moeforge.platform.engine.topology import ProcessGroups
from moeforge.platform.optim.adamw import build_adamw, clip_grads_with_norm_, grad_sq_sum
from moeforge.platform.optim.lr_schedule import set_lr
from torch import nn


def _group_size(ranks: list[int] | None) -> int:
    return len(ranks) if ranks else 1


def reduce_gradients(grads: list[torch.Tensor], groups: ProcessGroups, param_copies: int, kind: str) -> torch.Tensor:
    """The gradients as one flat tensor (a copy), scaled by param_copies / shard size and summed over
    group `kind` ("shard" or "expert_shard"): a DualPipe pair sums, dp replicas average. Collective
    over that group."""
    shard = _group_size(groups.ranks["shard"])
    flat = torch.cat([g.reshape(-1) for g in grads])
    if shard > 1:
        flat.mul_(param_copies / shard)
    if _group_size(groups.ranks[kind]) > 1:
        dist.all_reduce(flat, group=getattr(groups, kind))
    return flat


class PlainStep:
    """No ZeRO: flat all-reduce of gradients over the shard group, clip, torch AdamW."""

    def __init__(
        self,
        module: nn.Module,
        optim_cfg: OptimConfig,
        precision_cfg: PrecisionConfig,
        groups: ProcessGroups,
        param_copies: int,
        replicated: list[nn.Parameter],
        expert_params: list[nn.Parameter] = (),
    ) -> None:
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.named_params = list(module.named_parameters())
        self.optimizer = build_adamw(module.named_parameters(), optim_cfg, precision_cfg)
        self.groups = groups
        self.copies = param_copies
        expert_ids = {id(p) for p in expert_params}
        replicated_ids = {id(p) for p in replicated}
        # (parameters, the group holding the same values): reduced as one flat tensor each
        self.reductions = [
            ([p for p in self.params if id(p) not in expert_ids], "shard"),
            ([p for p in self.params if id(p) in expert_ids], "expert_shard"),
        ]
        self.norm_params = [p for p in self.params if id(p) not in replicated_ids and id(p) not in expert_ids]
        self.expert_norm_params = [p for p in self.params if id(p) in expert_ids]
        self.grad_clip = optim_cfg.grad_clip

    def step(self, grads: dict[int, torch.Tensor], lr: float) -> float:
        """Reduce, clip and apply `grads`, which this consumes (the dict is emptied, as ZeroStep's
        is), so the flat copy is the only full-size gradient left during the all-reduce and AdamW."""
        for params, kind in self.reductions:
            if params:
                self._reduce(params, grads, kind)
        sq = grad_sq_sum(self.norm_params)
        if self.expert_norm_params:
            expert_sq = grad_sq_sum(self.expert_norm_params)
            if _group_size(self.groups.ranks["ep"]) > 1:
                dist.all_reduce(expert_sq, group=self.groups.ep)
            sq = sq + expert_sq
        if _group_size(self.groups.ranks["norm"]) > 1:
            dist.all_reduce(sq, group=self.groups.norm)
        norm = sq.sqrt()
        clip_grads_with_norm_(self.params, norm, self.grad_clip)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def _reduce(self, params: list[nn.Parameter], grads: dict[int, torch.Tensor], kind: str) -> None:
        """Sum `params`' gradients over group `kind` as one flat all-reduce, scaled so that a
        DualPipe pair sums and dp replicas average; the parameters' .grad become views of it.

        The scale is copies / shard size for both kinds: an expert's gradient on an EP rank already
        sums the tokens of every replica of its EP group (the all-to-all brought them), each loss
        scaled by dp * n_m / N like every other gradient, so it too needs the 1/dp of the replicas'
        mean."""
        flat = reduce_gradients(
            [grads.pop(id(p), torch.zeros_like(p)) for p in params], self.groups, self.copies, kind
        )
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p)
            offset += n

    def state(self, layout=None) -> OptimizerState:
        """The optimizer state to checkpoint (AdamW moments by parameter name, at each parameter's
        place in the whole model: `layout`)."""
        return OptimizerState(self.optimizer, self.named_params, layout)
