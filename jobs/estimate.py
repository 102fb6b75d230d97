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

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from moeforge.model.accounting import (
    ClusterConfig,
    build_checked,
    estimate,
    format_table,
    model_config_from_dict,
    training_cost,
)
from moeforge.model.config import ConfigError
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

CONFIG_MODULE = "moeforge.conf"  # the same source as config_path="pkg://moeforge.conf"
CONFIG_NAME = "estimate"
PROG = "moeforge-estimate"
FORMATS = ("table", "json")
KNOWN_KEYS = {"model", "format", "tokens", "cluster"}


def _one_line(err: BaseException) -> str:
    text = str(err).split("Config search path")[0]  # Hydra appends its search path to lookup errors
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def run(argv: Sequence[str]) -> str:
    """Compose the config from Hydra overrides and return the report text."""
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        composed = compose(config_name=CONFIG_NAME, overrides=list(argv), return_hydra_config=True)
    name = str(composed.hydra.runtime.choices.get("model", ""))
    with open_dict(composed):
        del composed["hydra"]  # its run/sweep dirs interpolate job fields that compose leaves unset
    values = OmegaConf.to_container(composed, resolve=True)
    unknown = sorted(set(values) - KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key (known: {', '.join(sorted(KNOWN_KEYS))})")
    if values.get("format") not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {values.get('format')!r}")
    # Everything is validated before any work: model, cluster and token budget.
    model_cfg = model_config_from_dict(values["model"])
    cluster = build_checked(ClusterConfig, values.get("cluster") or {}, "cluster")
    est = estimate(model_cfg, name=name)
    cost = None if values.get("tokens") is None else training_cost(est, values["tokens"], cluster)
    if values["format"] == "json":
        report = est.to_dict()
        if cost is not None:
            report["cost"] = cost.to_dict()
        return json.dumps(report)
    return format_table(est, cost)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    try:
        print(run(argv))
    except (ConfigError, HydraException, OmegaConfBaseException) as err:
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
