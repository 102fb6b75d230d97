"""moeforge-estimate: parameters, training FLOPs and KV cache per token of a model config.

    moeforge-estimate model=deepseek_v3                      # aligned table
    moeforge-estimate model=qwen2_5_72b format=json          # one JSON object
    moeforge-estimate model=deepseek_v3 tokens=14.8e12 cluster.gpus=2048 cluster.mfu=0.4

Configs come from the `moeforge.conf` package (conf/estimate.yaml and conf/model/*.yaml), composed
with Hydra's compose API rather than `@hydra.main` so that a bad override, an unknown model or an
invalid value ends in one line on stderr and exit status 2, with no traceback, and so that an
estimate writes no output directory. The arithmetic lives in moeforge.model.accounting.
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

CONFIG_NAME = "estimate"
PROG = "moeforge-estimate"
FORMATS = ("table", "json")
KNOWN_KEYS = {"model", "format", "tokens", "cluster"}


def run(argv: Sequence[str]) -> str:
    """Compose the config from Hydra overrides and return the report text."""
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


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, __doc__, argv, run)


if __name__ == "__main__":
    sys.exit(main())
