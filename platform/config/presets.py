"""The shipped config groups (`conf/<group>/<name>.yaml`) read as plain values, outside Hydra.

Benchmarks and measurements that build one component's config from a preset read it here, so the
YAML on disk stays the one place the preset's values live."""

from __future__ import annotations

import importlib.resources
from importlib.resources.abc import Traversable

import yaml


def preset_path(group: str, name: str) -> Traversable:
    """conf/<group>/<name>.yaml inside the installed package."""
    return importlib.resources.files("moeforge.conf").joinpath(group, f"{name}.yaml")


def preset_exists(group: str, name: str) -> bool:
    """Whether conf/<group>/<name>.yaml ships (a bare name: no path separators)."""
    return bool(name) and "/" not in name and preset_path(group, name).is_file()


def preset_values(group: str, name: str) -> dict:
    """The preset's YAML as a dict. Model presets lose `arch`, an estimator tag that is not a
    ModelConfig field."""
    values = dict(yaml.safe_load(preset_path(group, name).read_text()) or {})
    if group == "model":
        values.pop("arch", None)
    return values
