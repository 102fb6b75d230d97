"""TrainConfig: the whole run, composed of the component configs and checked across them."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from moeforge.model.config import ModelConfig
from moeforge.platform.config.arch import ARCH_DEEPSEEK_V3, ARCH_FROM_CHECKPOINT
from moeforge.platform.config.builder import ConfigError, build_config
from moeforge.platform.config.checkpoint import CheckpointConfig
from moeforge.platform.config.cluster import RayClusterConfig
from moeforge.platform.config.data import DataConfig
from moeforge.platform.config.debug import DebugConfig
from moeforge.platform.config.init import InitConfig
from moeforge.platform.config.optim import OptimConfig
from moeforge.platform.config.parallel import ParallelConfig
from moeforge.platform.config.precision import PrecisionConfig
from moeforge.platform.config.resources import ResourcesConfig
from moeforge.platform.config.run import RunConfig
from moeforge.platform.config.tracking import TrackingConfig

_SECTIONS = {
    "run": RunConfig,
    "parallel": ParallelConfig,
    "resources": ResourcesConfig,
    "precision": PrecisionConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "tracking": TrackingConfig,
    "checkpoint": CheckpointConfig,
    "cluster": RayClusterConfig,
    "init": InitConfig,
    "debug": DebugConfig,
}


@dataclass
class TrainConfig:
    """One training run: the model and every component config, checked across sections on creation."""

    model: ModelConfig
    run: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: RayClusterConfig = field(default_factory=RayClusterConfig)
    init: InitConfig = field(default_factory=InitConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def __post_init__(self) -> None:
        self.check()

    @staticmethod
    def section_types() -> dict[str, type]:
        """Each top-level section's config dataclass, by its key."""
        return {"model": ModelConfig, **_SECTIONS}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from the composed Hydra config (as a plain dict) with `build_config`: an unknown
        section or key, a missing field or a value of the wrong type fails as one ConfigError with
        its dotted path (`model.n_group: expected int, got 8.0`); cross-section checks run last."""
        # A section given as None (an empty YAML mapping) takes its defaults, as a section left out.
        values = {name: value for name, value in values.items() if value is not None}
        unknown = sorted(set(values) - set(_SECTIONS) - {"model"})
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown config section (known: model, {', '.join(_SECTIONS)})")
        init_values = dict(values.get("init") or {})
        if "from" in init_values:  # the YAML key; the field is from_
            init_values["from_"] = init_values.pop("from")
        values["init"] = init_values
        init = build_config(InitConfig, init_values, "init")
        if "model" not in values and init.kind is None:
            raise ConfigError("model: missing (choose one, e.g. model=tiny)")
        if isinstance(values.get("model"), Mapping) or init.kind is not None:
            model = dict(values.get("model") or {})
            # `arch` tags the model YAMLs for moeforge-estimate; only the DeepSeek-V3 family trains.
            arch = model.pop("arch", ARCH_DEEPSEEK_V3)
            if arch == ARCH_FROM_CHECKPOINT and init.kind is None:
                raise ConfigError(
                    "model: from_checkpoint takes the model of init.from; set init.from=hf:<dir> or run:<dir>"
                )
            if arch not in (ARCH_DEEPSEEK_V3, ARCH_FROM_CHECKPOINT):
                raise ConfigError(
                    f"model.arch: moeforge-train trains {ARCH_DEEPSEEK_V3} models; {arch!r} configs are "
                    "for moeforge-estimate only"
                )
            if init.kind is not None:  # the checkpoint's model, the run's training knobs on top
                from moeforge.platform.checkpoint.init_from import model_config_from

                model = model_config_from(init, model)
            values["model"] = model
        return build_config(cls, values)

    def with_absolute_paths(self) -> TrainConfig:
        """A copy whose local relative paths (run.dir, data.path, data.cache_dir) are made absolute
        against the launching process's directory: Ray workers run elsewhere, so a path relative to
        the driver would silently point somewhere else on a worker. s3:// paths are kept."""

        def absolute(path: str | None) -> str | None:
            return path if not path or "://" in path else os.path.abspath(os.path.expanduser(path))

        run = dataclasses.replace(self.run, dir=absolute(self.run.dir))
        data = dataclasses.replace(
            self.data, path=absolute(self.data.path), cache_dir=absolute(self.data.cache_dir)
        )
        init = self.init
        if init.kind is not None:
            step = "" if init.step is None else f"@{init.step}"
            init = InitConfig(from_=f"{init.kind}:{absolute(init.path)}{step}")
        return dataclasses.replace(self, run=run, data=data, init=init)

    def notes(self) -> list[str]:
        """Settings that are valid but probably not meant, each said once when the run starts."""
        found = []
        if self.optim.warmup_steps >= self.run.steps:
            found.append(
                f"optim.warmup_steps={self.optim.warmup_steps} is not shorter than run.steps={self.run.steps}: "
                "the whole run is warm-up, and the learning rate never decays"
            )
        model = self.model
        if model.seq_len > model.max_position_embeddings:
            found.append(
                f"model.seq_len={model.seq_len} exceeds model.max_position_embeddings="
                f"{model.max_position_embeddings}: positions past it are longer than the model is made for"
            )
        return found

    def check(self) -> None:
        """Cross-section checks that need more than one component's values."""
        par, data, res = self.parallel, self.data, self.resources
        # Only a pipeline run has process groups; the one-process loop runs without a backend.
        nccl = par.schedule != "single" and par.backend in ("auto", "nccl")
        if nccl and par.backend == "nccl" and res.gpus_per_worker <= 0:
            raise ConfigError(
                "parallel.backend: nccl runs on GPUs, and resources.gpus_per_worker is 0: give the workers "
                "GPUs (resources.gpus_per_worker=1), or use backend=gloo (or auto) on CPUs"
            )
        # Ray would place two ranks on one GPU, which NCCL refuses ("Duplicate GPU detected").
        if nccl and not float(res.gpus_per_worker).is_integer():
            raise ConfigError(
                f"resources.gpus_per_worker: must be a whole number of GPUs with NCCL "
                f"(parallel.backend={par.backend}), got {res.gpus_per_worker}: a fraction puts two "
                "ranks on one GPU, which NCCL refuses"
            )
        per_step = par.microbatches * par.dp
        if data.global_batch % per_step:
            raise ConfigError(
                f"data.global_batch ({data.global_batch}) must be divisible by "
                f"parallel.microbatches * parallel.dp ({per_step})"
            )
        experts = self.model.n_routed_experts
        if par.ep > 1 and experts % par.ep:
            raise ConfigError(
                f"parallel.ep: model.n_routed_experts ({experts}) must be divisible by ep ({par.ep})"
            )
