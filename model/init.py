"""Weight initialisation: normal(0, std) for every weight matrix, norms 1, biases and buffers 0.

Each tensor draws from its own generator seeded by (seed, parameter name), so the values do not
depend on which other parameters exist: a pipeline stage that materialises only its own layers gets
exactly the weights the full single-process model has. Stacked routed-expert weights draw one
generator per expert, seeded by (seed, name, global expert index), so an expert-parallel rank that
holds a slice of the experts gets the full layer's rows of the same indices.

Every tensor is drawn on the CPU (a CPU generator, or the CPU's default one without a seed) in the
parameter's dtype and layout, then copied to the parameter's device: a CUDA generator draws other
numbers from the same seed, so a pipeline rank on a GPU would otherwise start from other weights
than the single-process reference on the CPU. On the CPU the values are exactly an in-place draw's.
"""

from __future__ import annotations

import zlib

import torch
from moeforge.model.moe import RoutedExperts
from moeforge.model.norm import RMSNorm
from torch import nn


def _generator(seed: int, name: str) -> torch.Generator:
    """The CPU generator of one tensor, seeded by (seed, name)."""
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return g


def _normal_(p: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
    """Fill `p` with normal(0, std) drawn on the CPU (`generator`, or the CPU's default one) in its
    dtype and strides, then copied to p's device: the same values on every device."""
    p.copy_(torch.empty_like(p, device="cpu").normal_(0.0, std, generator=generator))


@torch.no_grad()
def init_weights(model: nn.Module, std: float, seed: int | None = None) -> None:
    """Initialise `model` in place, the same values whatever device it is on (on the meta device
    nothing is stored)."""
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
                _normal_(p[row], std, _generator(seed, f"{name}.{index}"))
        elif p.dim() == 1:  # linear biases
            p.zero_()
        else:
            _normal_(p, std, None if seed is None else _generator(seed, name))
    for name, buf in model.named_buffers():
        if buf.is_floating_point():
            buf.zero_()  # router biases and load counters
