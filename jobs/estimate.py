"""moeforge-estimate: parameters, training FLOPs and KV cache per token of a model config, and the
per-rank memory plan of a parallel layout.

    moeforge-estimate model=deepseek_v3                      # aligned table
    moeforge-estimate model=qwen2_5_72b format=json          # one JSON object
    moeforge-estimate model=deepseek_v3 tokens=14.8e12 cluster.gpus=2048 cluster.mfu=0.4
    moeforge-estimate experiment=v3_671b_2048gpu             # + memory plan of the training preset
    moeforge-estimate model=tiny parallel=dualpipe_pp2_dp2 parallel.ep=2 format=json

Configs come from the `moeforge.conf` package (conf/estimate.yaml and conf/model/*.yaml), composed
with Hydra's compose API rather than `@hydra.main` so that a bad override, an unknown model or an
invalid value ends in one line on stderr and exit status 2, with no traceback, and so that an
estimate writes no output directory. The arithmetic lives in moeforge.model.accounting.

Any override of a training section (experiment, parallel, precision, data, optim, run, ...) asks for a
layout: the overrides other than format / tokens / cluster then compose conf/train.yaml, exactly as
moeforge-train would, into a validated TrainConfig, and its per-rank memory plan
(moeforge.platform.runtime.memory_plan) is printed after the estimate (JSON: `per_rank`, the most
loaded rank, and `memory_plan`, the layout and every pipeline rank).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from moeforge.model.accounting import (
    ClusterConfig,
    estimate,
    format_table,
    model_config_from_dict,
    training_cost,
)
from moeforge.model.config import ConfigError, build_config
from moeforge.platform.cli import compose_values, run_cli
from omegaconf import OmegaConf

CONFIG_NAME = "estimate"
TRAIN_CONFIG_NAME = "train"
PROG = "moeforge-estimate"
FORMATS = ("table", "json")
KNOWN_KEYS = {"model", "format", "tokens", "cluster"}
ESTIMATE_ONLY_KEYS = KNOWN_KEYS - {"model"}  # conf/estimate.yaml's own keys, absent from conf/train.yaml
# Top-level keys of conf/train.yaml besides the model: overriding one asks for a memory plan.
TRAIN_KEYS = {"experiment", "run", "parallel", "precision", "data", "optim", "tracking", "checkpoint"}

# conf/train.yaml's run.dir interpolates this resolver of jobs/train.py (a -m sweep member's
# sub-directory). An estimate is never a sweep member, so its value is '' -- registered only when
# moeforge.jobs.train has not registered the real one in this process.
if not OmegaConf.has_resolver("moeforge.sweep_subdir"):
    OmegaConf.register_new_resolver("moeforge.sweep_subdir", lambda: "")


def _key(override: str) -> str:
    """The top-level config key an override sets: '+parallel.ep=2' -> 'parallel'."""
    return override.lstrip("+~").split("=", 1)[0].split(".", 1)[0].split("@", 1)[0]


def run(argv: Sequence[str]) -> str:
    """Compose the config from Hydra overrides and return the report text."""
    if any(_key(a) in TRAIN_KEYS for a in argv):
        return _run_with_plan(argv)
    values, choices = compose_values(CONFIG_NAME, argv)
    name = choices.get("model", "")
    unknown = sorted(set(values) - KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key (known: {', '.join(sorted(KNOWN_KEYS))})")
    if values.get("format") not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {values.get('format')!r}")
    # Everything is validated before any work: model, cluster and token budget.
    model_cfg = model_config_from_dict(values["model"])
    cluster = build_config(ClusterConfig, values.get("cluster") or {}, "cluster")
    est = estimate(model_cfg, name=name)
    cost = None if values.get("tokens") is None else training_cost(est, values["tokens"], cluster)
    if values["format"] == "json":
        report = est.to_dict()
        if cost is not None:
            report["cost"] = cost.to_dict()
        return json.dumps(report)
    return format_table(est, cost)


def _run_with_plan(argv: Sequence[str]) -> str:
    """The estimate of the training config's model, then the memory plan of its layout."""
    from moeforge.platform.config.train import TrainConfig

    own = [a for a in argv if _key(a) in ESTIMATE_ONLY_KEYS]
    values, _ = compose_values(CONFIG_NAME, own)  # format, tokens, cluster (its model is not used)
    train_values, choices = compose_values(TRAIN_CONFIG_NAME, [a for a in argv if a not in own])
    if values.get("format") not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {values.get('format')!r}")
    config = TrainConfig.from_dict(train_values)
    cluster = build_config(ClusterConfig, values.get("cluster") or {}, "cluster")
    est = estimate(config.model, name=choices.get("model", ""))
    cost = None if values.get("tokens") is None else training_cost(est, values["tokens"], cluster)
    # Imported once the config is valid: the stage split pulls in torch (seconds).
    from moeforge.platform.runtime.memory_plan import format_plan, plan_memory

    plan = plan_memory(config)
    if values["format"] == "json":
        report = est.to_dict()
        if cost is not None:
            report["cost"] = cost.to_dict()
        report.update(plan.to_dict())
        return json.dumps(report)
    return format_table(est, cost) + "\n\n" + format_plan(plan)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, __doc__, argv, run)


if __name__ == "__main__":
    sys.exit(main())
