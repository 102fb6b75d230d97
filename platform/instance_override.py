"""One method of one module instance, replaced from outside the model.

The precision policy and the recomputation policy change how a module computes without touching
its class, parameters or names (so checkpoints, optimizers and the HF loader see the same module):
they put a function in the instance's __dict__, which Python finds before the class's method.
Setting the override again replaces it; None removes it, restoring the class's method.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def override_method(module: nn.Module, name: str, replacement: Callable | None) -> None:
    """module.<name> becomes `replacement` for this instance only; None restores the class's."""
    module.__dict__.pop(name, None)
    if replacement is not None:
        module.__dict__[name] = replacement
