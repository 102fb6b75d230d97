"""Build a config dataclass from a mapping, naming unknown keys with their dotted path."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from moeforge.model.accounting import build_checked
from moeforge.model.config import ConfigError

T = TypeVar("T")


def build(cls: type[T], values: Mapping[str, Any] | None, where: str) -> T:
    """`cls(**values)`, but an unknown key or a value of the wrong type (`run.steps=abc`) fails as
    `where.key` before the dataclass is built (the checks model configs use too)."""
    return build_checked(cls, values or {}, where)


def require(cond: bool, field: str, message: str) -> None:
    """Raise ConfigError('field: message') unless cond holds."""
    if not cond:
        raise ConfigError(f"{field}: {message}")
