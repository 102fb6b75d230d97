"""Build a config dataclass from a mapping, naming unknown keys with their dotted path."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

from moeforge.model.config import ConfigError

T = TypeVar("T")


def build(cls: type[T], values: Mapping[str, Any] | None, where: str) -> T:
    """`cls(**values)`, but an unknown key fails as `where.key` before the dataclass is built."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    try:
        return cls(**values)
    except ConfigError as err:
        msg = str(err)
        raise ConfigError(msg if msg.startswith(where + ".") else f"{where}.{msg}") from None


def require(cond: bool, field: str, message: str) -> None:
    """Raise ConfigError('field: message') unless cond holds."""
    if not cond:
        raise ConfigError(f"{field}: {message}")
