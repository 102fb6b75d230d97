"""The config builder: plain values (YAML, Hydra) into any config dataclass of moeforge, checked.

`build_config` is the one builder, for the model's `ModelConfig` and every platform section alike:
keys and types are checked before the dataclass is built, and every failure, the dataclass's own
`__post_init__` checks included, is one ConfigError naming the dotted key (`model.n_group`), so a
bad YAML fails before any work starts. The model raises plain ValueError (it knows nothing of the
platform); the builder gives those the path they were built at.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field (`parallel.pp: must be >= 1`)."""


def build(cls: type[T], values: Mapping[str, Any] | None, where: str) -> T:
    """`build_config` for a section: a section left out of the YAML (None) takes every default."""
    return build_config(cls, values or {}, where)


def require(cond: bool, field: str, message: str) -> None:
    """Raise ConfigError('field: message') unless cond holds."""
    if not cond:
        raise ConfigError(f"{field}: {message}")


def build_config(cls: type[T], values: Mapping[str, Any], where: str = "") -> T:
    """Build the config dataclass `cls` from plain values (YAML, or Hydra after OmegaConf.to_container).

    Before `cls(**values)` runs, every key must be a field of `cls`, every field without a default
    must be given, and every value must have its field's annotated type. Each failure raises one
    ConfigError naming the dotted key under `where` (`model.n_group: expected int, got 8.0`). The
    dataclass's own `__post_init__` checks name fields relative to the dataclass; their messages get
    the `where.` prefix here. `where=""` builds a root config (keys are named as they are).

    Type rules (strict, because a silently converted typo trains the wrong model):
    - int: an int, never a bool or a float (8.0 included: Hydra reads `n_group=8.0` as a float);
    - float: a float, or an int (converted to float); never a bool or a string;
    - str and bool: exactly that type;
    - `X | None` / Optional, unions: the first member that fits;  Literal: one of its values;
    - list[X], tuple[X, ...], tuple[X, Y]: a list or tuple (any sequence but a string), checked
      element by element (`key[i]`); tuples are built as tuples, since YAML has only lists;
    - dict[K, V]: a mapping, checked entry by entry (`key.name`);
    - a nested config dataclass: a mapping (built recursively, errors keep the full path) or an
      instance;  Any: anything.
    An annotation outside these rules is a programming error (TypeError), not a user error.
    """
    if not isinstance(values, Mapping):
        raise ConfigError(
            f"{where or cls.__name__}: expected a mapping of {cls.__name__} fields, got {values!r}"
        )
    # A field whose user-facing key is a Python keyword (`checkpoint.async`) is spelled otherwise in
    # the dataclass; the class maps the key in KEY_ALIASES ({"async": "async_save"}).
    aliases = getattr(cls, "KEY_ALIASES", {})
    values = {aliases.get(key, key): value for key, value in values.items()}
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted((key for key in values if key not in fields), key=str)
    if unknown:
        spelled = {field: key for key, field in aliases.items()}  # name fields as the user writes them
        known = ", ".join(sorted(spelled.get(name, name) for name in fields))
        raise ConfigError(f"{_join(where, unknown[0])}: unknown key (known: {known})")
    missing = [
        name
        for name, f in fields.items()
        if name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{_join(where, missing[0])}: missing (required)")
    hints = typing.get_type_hints(cls)
    kwargs = {key: _typed(value, hints[key], _join(where, key)) for key, value in values.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:  # a __post_init__ check (the model's raise ValueError)
        msg = str(err)
        # A dataclass that already names itself in full (its own `where.` prefix) is left as it is.
        raise ConfigError(msg if not where or msg.startswith(f"{where}.") else f"{where}.{msg}") from None


class _WrongType(ConfigError):
    """`value` at `where` is not of type `hint`; a union tries its next member on this error only."""

    def __init__(self, where: str, hint: Any, value: Any) -> None:
        super().__init__(f"{where}: expected {_describe(hint)}, got {value!r}")
        self.where = where


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _typed(value: Any, hint: Any, where: str) -> Any:
    """`value` checked against `hint` (and converted: int -> float, list -> tuple, mapping -> dataclass)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return _typed(value, arg, where)
            except _WrongType as err:
                if err.where != where:  # the value fits this member's shape; an element inside is wrong
                    raise
        raise _WrongType(where, hint, value)
    if origin is Literal:
        if any(type(value) is type(arg) and value == arg for arg in args):
            return value
        raise _WrongType(where, hint, value)
    if hint is type(None) or hint is None:
        if value is None:
            return None
        raise _WrongType(where, hint, value)
    if hint in (bool, int, str):
        if type(value) is hint or (isinstance(value, hint) and not isinstance(value, bool)):
            return value
        raise _WrongType(where, hint, value)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _WrongType(where, hint, value)
    if hint in (list, tuple) or origin in (list, tuple):
        # Any sequence but a string: YAML gives lists, an OmegaConf ListConfig is a Sequence too.
        if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
            raise _WrongType(where, hint, value)
        if hint is tuple or origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                args = (args[0],) * len(value)
            elif not args:
                args = (Any,) * len(value)
            elif len(args) != len(value):
                raise _WrongType(where, hint, value)
            return tuple(
                _typed(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        item = args[0] if args else Any
        return [_typed(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is dict or origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _WrongType(where, hint, value)
        key_hint, value_hint = args or (Any, Any)
        return {
            _typed(k, key_hint, _join(where, k)): _typed(v, value_hint, _join(where, k))
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return build_config(hint, value, where)
        raise _WrongType(where, hint, value)
    raise TypeError(f"{where}: build_config has no rule for the annotation {hint!r}")


def _describe(hint: Any) -> str:
    """The type as the error messages name it: int, float, list[int], int | None, one of 'a', 'b'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " | ".join(_describe(arg) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if hint is type(None) or hint is None:
        return "None"
    if isinstance(hint, type) and not args:
        return hint.__name__
    return str(hint).replace("typing.", "")
