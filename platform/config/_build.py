"""Build a platform config dataclass from a mapping: `moeforge.model.config.build_config`, the one builder.

model/ may not import platform/, so the builder lives beside ModelConfig and platform/ uses it from
there; `build` only adds that a section left out of the YAML (None) takes every default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from moeforge.model.config import ConfigError, build_config

T = TypeVar("T")


def build(cls: type[T], values: Mapping[str, Any] | None, where: str) -> T:
    """`cls(**values)`, but an unknown key, a missing field or a value of the wrong type
    (`run.steps=abc`, `parallel.pp=2.5`) fails as `where.key` before the dataclass is built, and
    `__post_init__` errors are prefixed with `where.` (see `build_config`)."""
    return build_config(cls, values or {}, where)


def require(cond: bool, field: str, message: str) -> None:
    """Raise ConfigError('field: message') unless cond holds."""
    if not cond:
        raise ConfigError(f"{field}: {message}")
