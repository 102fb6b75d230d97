"""Base for Linear replacements that the precision policy swaps in from outside the model."""

from __future__ import annotations

from torch import nn


class SwappableLinear(nn.Linear):
    """An nn.Linear subclass (isinstance checks, parameter names and shapes unchanged) that can be
    built around an existing nn.Linear's parameter objects."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SwappableLinear:
        """A module of this class sharing `linear`'s parameters (no copy: optimizers stay valid)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight = linear.weight
        module.bias = linear.bias
        module.train(linear.training)
        return module
