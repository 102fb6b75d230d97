"""Weight initialisation: normal(0, std) for every weight matrix, norms 1, biases and buffers 0.

Each tensor draws from its own generator seeded by (seed, parameter name), so the values do not
depend on which other parameters exist: a pipeline stage that materialises only its own layers gets
exactly the weights the full single-process model has. Stacked routed-expert weights draw one
generator per expert, seeded by (seed, name, global expert index), so an expert-parallel rank that
holds a slice of the experts gets the full layer's rows of the same indices.
"""

from __future__ import annotations

import zlib

import torch
from moeforge.model.moe import RoutedExperts
from moeforge.model.norm import RMSNorm
from torch import nn


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return g


@torch.no_grad()
def init_weights(model: nn.Module, std: float, seed: int | None = None) -> None:
    """Initialise `model` in place (it must not be on the meta device)."""
    norm_weights = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    # id(stacked expert weight) -> global index of its row 0
    first_expert = {
        id(p): m.first_expert for m in model.modules() if isinstance(m, RoutedExperts) for p in m.parameters()
    }
    for name, p in model.named_parameters():
        if id(p) in norm_weights:
            p.fill_(1.0)
        elif id(p) in first_expert and seed is not None:
            for row in range(p.shape[0]):  # [experts, out, in]: one generator per global expert
                index = first_expert[id(p)] + row
                p[row].normal_(0.0, std, generator=_generator(seed, f"{name}.{index}", p.device))
        elif p.dim() == 1:  # linear biases
            p.zero_()
        elif seed is None:
            p.normal_(0.0, std)
        else:
            p.normal_(0.0, std, generator=_generator(seed, name, p.device))
    for name, buf in model.named_buffers():
        if buf.is_floating_point():
            buf.zero_()  # router biases and load counters
