"""Split a Transformer into pipeline stages by layer ranges, and build the part one rank holds.

Stage s of S holds main-model blocks `layers[start:end]`; stage 0 also holds the embedding and
stage S-1 the final norm, the head and the MTP modules (which also need the embedding: on a rank that
holds both ends it is the same Parameter, otherwise the last stage holds a copy whose gradient the
runtime sums with the first stage's, see topology.tie_group).

The model code is used unchanged: a stage calls `model.embed_tokens`, the blocks and
`model.head_and_loss` of a Transformer built on the meta device, of which only the modules this rank
needs are materialised. Each tensor is initialised from (seed, parameter name) by model/init.py, so a
rank's weights equal the single-process model's weights of the same names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from moeforge.model.config import ConfigError, ModelConfig
from moeforge.model.init import init_weights
from moeforge.model.moe import MoE
from moeforge.model.transformer import Transformer, build_model
from moeforge.platform.moe.expert_placement import ExpertPlacement
from moeforge.platform.moe.install import shard_experts
from torch import nn


@dataclass(frozen=True)
class StageSpec:
    """What model stage `stage` computes: main-model blocks `layers`, plus the embedding (`first`)
    and/or the final norm + head + MTP chain with the loss (`last`)."""

    stage: int
    layers: range
    first: bool
    last: bool


def split_layers(
    num_layers: int, num_stages: int, layers_per_stage: Sequence[int] | None = None
) -> list[StageSpec]:
    """Contiguous layer ranges for `num_stages` stages: even (num_layers divisible by num_stages) or
    the explicit `layers_per_stage` counts (summing to num_layers; a count may be 0)."""
    if num_stages < 1:
        raise ConfigError(f"parallel: a pipeline needs >= 1 stage, got {num_stages}")
    if layers_per_stage is None:
        if num_layers % num_stages:
            raise ConfigError(
                f"model.num_hidden_layers ({num_layers}) is not divisible by the {num_stages} pipeline "
                f"stages the schedule needs; set parallel.layers_per_stage to an explicit split"
            )
        counts = [num_layers // num_stages] * num_stages
    else:
        counts = list(layers_per_stage)
        if len(counts) != num_stages:
            raise ConfigError(
                f"parallel.layers_per_stage: needs {num_stages} entries (one per stage), got {len(counts)}"
            )
        if any((not isinstance(c, int)) or c < 0 for c in counts):
            raise ConfigError(f"parallel.layers_per_stage: entries must be integers >= 0, got {counts}")
        if sum(counts) != num_layers:
            raise ConfigError(
                f"parallel.layers_per_stage: sums to {sum(counts)}, model.num_hidden_layers is {num_layers}"
            )
    specs, start = [], 0
    for stage, count in enumerate(counts):
        specs.append(StageSpec(stage, range(start, start + count), stage == 0, stage == num_stages - 1))
        start += count
    return specs


class RankModule(nn.Module):
    """The modules one rank holds, under the full model's attribute names (`embed`, `layers.<i>`,
    `norm`, `head`, `mtp.<d>`), so `named_parameters()` and `state_dict()` keys equal the
    single-process model's. It only references the Transformer's own submodules."""

    def __init__(self, model: Transformer, specs: Sequence[StageSpec]) -> None:
        super().__init__()
        needs_embed = any(s.first for s in specs) or (any(s.last for s in specs) and len(model.mtp) > 0)
        if needs_embed:
            self.embed = model.embed
        # ModuleDict keyed by layer id: parameter names read "layers.3.attn...", as in nn.ModuleList.
        layer_ids = sorted({i for s in specs for i in s.layers})
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        if any(s.last for s in specs):
            self.norm = model.norm
            self.head = model.head
            self.mtp = model.mtp
        self.layer_ids = layer_ids

    def moe_layers(self) -> list[MoE]:
        """This rank's MoE modules in the full model's order (main blocks, then MTP blocks)."""
        blocks = [self.layers[str(i)] for i in self.layer_ids]
        blocks += [m.block for m in getattr(self, "mtp", [])]
        return [b.mlp for b in blocks if isinstance(b.mlp, MoE)]


class StageChunk:
    """Runs one model stage with the unchanged model code."""

    def __init__(self, model: Transformer, spec: StageSpec, rank_module: RankModule) -> None:
        self.model = model
        self.spec = spec
        self.blocks = [model.layers[i] for i in spec.layers]
        # The parameters this stage's forward touches (the MTP chain also reads the embedding).
        modules: list[nn.Module] = list(self.blocks)
        if spec.first:
            modules.append(model.embed)
        if spec.last:
            modules += [model.norm, model.head, model.mtp]
            if len(model.mtp) > 0 and not spec.first:
                modules.append(model.embed)
        mtp_blocks = [m.block for m in model.mtp] if spec.last else []
        self.moe_layers = [b.mlp for b in self.blocks + mtp_blocks if isinstance(b.mlp, MoE)]
        seen: set[int] = set()
        self.params: list[nn.Parameter] = []
        for m in modules:
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    self.params.append(p)

    def forward(
        self,
        x: torch.Tensor | None,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        mtp_loss_weight: float | None = None,
    ):
        """x [b, s, hidden] from the previous stage (None on the first stage) -> h [b, s, hidden],
        or on the last stage the model's LossOutput, its MTP term weighted by `mtp_loss_weight`
        (the step's scheduled lambda; None: model.mtp_loss_weight)."""
        h = self.model.embed_tokens(input_ids) if self.spec.first else x
        for block in self.blocks:
            h = block(h)
        if self.spec.last:
            return self.model.head_and_loss(h, input_ids, labels, mtp_loss_weight)
        return h


def build_rank(
    cfg: ModelConfig,
    specs: Sequence[StageSpec],
    seed: int,
    device: str | torch.device = "cpu",
    experts: ExpertPlacement | None = None,
) -> tuple[Transformer, RankModule]:
    """Build the Transformer on meta, materialise only the modules of `specs` on `device` and
    initialise them exactly as `build_model(cfg, seed=seed)` would.

    With `experts` (expert parallelism) each MoE layer holds only that placement's local experts,
    with the full model's weights of the same global indices. `device="meta"` stops before
    materialising: the memory plan counts a rank's parameters that way."""
    model = build_model(cfg, device="meta")
    rank_module = RankModule(model, specs)
    if experts is not None:
        shard_experts(rank_module.moe_layers(), experts)
    if torch.device(device).type == "meta":
        return model, rank_module
    rank_module.to_empty(device=device)
    init_weights(rank_module, cfg.initializer_range, seed)
    for moe in rank_module.moe_layers():
        moe.reset_load()
    rank_module.train()
    return model, rank_module
