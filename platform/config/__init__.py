"""Typed, validated configuration for a training run: one dataclass per component.

Hydra YAML (conf/) is a thin layer of values; `TrainConfig.from_dict` turns the composed config into
these dataclasses and every error names the field (e.g. `parallel.pp`), before any worker starts.
"""

from moeforge.platform.config.builder import ConfigError
from moeforge.platform.config.checkpoint import CheckpointConfig
from moeforge.platform.config.cluster import RayClusterConfig
from moeforge.platform.config.data import DataConfig
from moeforge.platform.config.debug import DebugConfig
from moeforge.platform.config.optim import OptimConfig
from moeforge.platform.config.parallel import ParallelConfig
from moeforge.platform.config.precision import PrecisionConfig
from moeforge.platform.config.resources import ResourcesConfig
from moeforge.platform.config.run import RunConfig
from moeforge.platform.config.tracking import TrackingConfig
from moeforge.platform.config.train import TrainConfig

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DebugConfig",
    "OptimConfig",
    "ParallelConfig",
    "PrecisionConfig",
    "RayClusterConfig",
    "ResourcesConfig",
    "RunConfig",
    "TrackingConfig",
    "TrainConfig",
]
