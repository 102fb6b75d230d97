"""moeforge-estimate: parameters, training FLOPs and KV cache per token of a model config, and the
per-rank memory plan of a parallel layout.

    moeforge-estimate model=deepseek_v3                      # aligned table
    moeforge-estimate model=qwen2_5_72b format=json          # one JSON object
    moeforge-estimate model=deepseek_v3 tokens=14.8e12 cluster.gpus=2048 cluster.mfu=0.4
    moeforge-estimate experiment=v3_671b_2048gpu             # + memory plan of the training preset
    moeforge-estimate model=tiny parallel=dualpipe_pp2_dp2 parallel.ep=2 format=json
    moeforge-estimate model=deepseek_v3 network=h800_ib       # + the network plan

Configs come from the `moeforge.conf` package (conf/estimate.yaml and conf/model/*.yaml), composed
with Hydra's compose API rather than `@hydra.main` so that a bad override, an unknown model or an
invalid value ends in one line on stderr and exit status 2, with no traceback, and so that an
estimate writes no output directory. The arithmetic lives in moeforge.platform.plan.accounting.

Any override of a training section (experiment, parallel, precision, data, optim, run, ...) asks for a
layout: the overrides other than format / tokens / cluster then compose conf/train.yaml, exactly as
moeforge-train would, into a validated TrainConfig, and its per-rank memory plan
(moeforge.platform.plan.memory_plan) is printed after the estimate (JSON: `per_rank`, the most
loaded rank, and `memory_plan`, the layout and every pipeline rank).

`network=<name>` (conf/network/*.yaml; none by default) adds the network plan of
moeforge.platform.plan.network_plan after the other sections (JSON: `network`): EP all-to-all bytes
and time per MoE layer, whether DualPipe's overlap hides them at cluster.peak_tflops x cluster.mfu,
the decode-speed bound, and the sizes of the fabrics the paper compares. With a training layout its
parallel.ep and tokens per micro-batch replace the network file's `ep` and `microbatch_tokens`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

from moeforge.platform.cli import compose_values, run_cli
from moeforge.platform.config.builder import ConfigError, build_config
from moeforge.platform.plan.accounting import (
    ClusterConfig,
    estimate,
    format_table,
    model_config_from_dict,
    training_cost,
)
from moeforge.platform.plan.network_config import NetworkConfig, network_config_from_dict
from moeforge.platform.plan.network_plan import NetworkPlan, format_network, plan_network
from omegaconf import OmegaConf

CONFIG_NAME = "estimate"
TRAIN_CONFIG_NAME = "train"
PROG = "moeforge-estimate"
FORMATS = ("table", "json")
KNOWN_KEYS = {"model", "format", "tokens", "cluster", "network"}
ESTIMATE_ONLY_KEYS = KNOWN_KEYS - {"model"}  # conf/estimate.yaml's own keys, absent from conf/train.yaml
# Top-level keys of conf/train.yaml besides the model: overriding one asks for a memory plan.
TRAIN_KEYS = {"experiment", "run", "parallel", "resources", "precision", "data", "optim", "tracking", "checkpoint"}

# conf/train.yaml's run.dir interpolates this resolver, `moeforge.jobs.train._sweep_subdir` (a -m sweep
# member's sub-directory). An estimate is never a sweep member, so its value is '' -- registered only when
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
    # Everything is validated before any work: model, cluster, network and token budget.
    model_cfg = model_config_from_dict(values["model"])
    cluster = build_config(ClusterConfig, values.get("cluster") or {}, "cluster")
    net = _network_config(values)
    est = estimate(model_cfg, name=name)
    cost = None if values.get("tokens") is None else training_cost(est, values["tokens"], cluster)
    network = _network_plan(net, choices, model_cfg, cluster)
    if values["format"] == "json":
        report = est.to_dict()
        if cost is not None:
            report["cost"] = cost.to_dict()
        if network is not None:
            report["network"] = network.to_dict()
        return json.dumps(report)
    return format_table(est, cost) + _network_section(network)


def _network_config(values: dict[str, Any]) -> NetworkConfig | None:
    """conf/network/<name>.yaml as chosen by `network=` (None when none was)."""
    if values.get("network") is None:
        return None
    return network_config_from_dict(values["network"])


def _network_plan(
    net: NetworkConfig | None,
    choices: dict[str, str],
    model_cfg: Any,
    cluster: ClusterConfig,
    layout: dict[str, int] | None = None,
) -> NetworkPlan | None:
    """The network plan of `net` (None without one); `layout` (ep, microbatch_tokens) comes from a
    training config and replaces the network file's values."""
    if net is None:
        return None
    if layout:
        try:
            net = dataclasses.replace(net, **layout)  # re-validated by __post_init__
        except ConfigError as err:
            raise ConfigError(f"network.{err} (ep and microbatch_tokens from the training layout)") from None
    return plan_network(model_cfg, cluster, net, name=choices.get("network", ""))


def _network_section(network: NetworkPlan | None) -> str:
    if network is None:
        return ""
    return "\n\n" + format_network(network)


def _run_with_plan(argv: Sequence[str]) -> str:
    """The estimate of the training config's model, then the memory plan of its layout."""
    from moeforge.platform.config.train import TrainConfig

    own = [a for a in argv if _key(a) in ESTIMATE_ONLY_KEYS]
    values, own_choices = compose_values(CONFIG_NAME, own)  # format, tokens, cluster, network (not model)
    train_values, choices = compose_values(TRAIN_CONFIG_NAME, [a for a in argv if a not in own])
    if values.get("format") not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {values.get('format')!r}")
    config = TrainConfig.from_dict(train_values)
    cluster = build_config(ClusterConfig, values.get("cluster") or {}, "cluster")
    net = _network_config(values)
    est = estimate(config.model, name=choices.get("model", ""))
    cost = None if values.get("tokens") is None else training_cost(est, values["tokens"], cluster)
    # Imported once the config is valid: the stage split pulls in torch (seconds).
    from moeforge.platform.plan.memory_plan import format_plan, plan_memory

    plan = plan_memory(config)
    layout = {"ep": config.parallel.ep, "microbatch_tokens": plan.tokens_per_microbatch}
    network = _network_plan(net, own_choices, config.model, cluster, layout)
    if values["format"] == "json":
        report = est.to_dict()
        if cost is not None:
            report["cost"] = cost.to_dict()
        report.update(plan.to_dict())
        if network is not None:
            report["network"] = network.to_dict()
        return json.dumps(report)
    return format_table(est, cost) + "\n\n" + format_plan(plan) + _network_section(network)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, __doc__, argv, run)


if __name__ == "__main__":
    sys.exit(main())
