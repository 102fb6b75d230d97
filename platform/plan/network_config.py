"""The network config of a training cluster (conf/network/*.yaml): its scale-up domain and NIC, its
switches, the communication precision of expert parallelism (EP), and the workload it is planned at.
Validated on construction; errors name the field.

    net = network_config_from_dict(yaml_values)    # errors read `network.<field>: ...`

The H800 defaults follow "Insights into DeepSeek-V3" (arXiv 2505.09343): 8 GPUs per node, one
400 Gb/s CX7 InfiniBand NIC per GPU, 64-port switches, one MPFT plane per GPU index of a node.
DeepEP's README gives the effective bandwidths: about 160 GB/s NVLink and 50 GB/s per 400 Gb/s NIC on
H800. The arithmetic that uses this config is in `network_traffic` and `network_fabrics`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moeforge.platform.config.builder import ConfigError, build_config
from moeforge.platform.plan.network_fabrics import dragonfly_h, slim_fly_shape

GBIT_BYTES = 1e9 / 8  # bytes per second in one Gb/s (decimal, as link rates are quoted)
GB = 1e9  # decimal gigabyte, as bandwidths are quoted ("50 GB/s", "900 GB/s")
DTYPE_BYTES = {"fp8": 1, "bf16": 2}  # bytes per value on the wire
_POSITIVE_INTS = ("gpus_per_node", "switch_radix", "planes", "ep", "microbatch_tokens", "decode_tokens")


@dataclass
class NetworkConfig:
    """A cluster's network, the communication precision of EP, and the workload it is planned at.

    Values of conf/network/*.yaml; errors name the field (`build_config` prefixes `network.`).
    """

    gpus_per_node: int = 8  # GPUs in one scale-up (NVLink) domain
    nic_gbps: float = 400.0  # scale-out NIC line rate per GPU, Gb/s (H800: one 400 Gb/s CX7 each)
    nic_efficiency: float = 1.0  # achieved fraction of the line rate (the paper's bound uses 1.0)
    scale_up_gbytes_per_s: float = 160.0  # effective per GPU and direction, GB/s (H800 NVLink)
    switch_radix: int = 64  # ports per switch (400G InfiniBand: 64)
    planes: int = 8  # MPFT planes (one per GPU index within a node)
    ep: int = 64  # expert-parallel degree the plan assumes (V3: EP64 over 8 nodes)
    dispatch_dtype: str = "fp8"  # fp8 (V3) | bf16
    combine_dtype: str = "bf16"  # bf16 (V3) | fp8
    fp8_scales: bool = True  # count FP8's per-tile FP32 scales (the paper's decode bound omits them)
    microbatch_tokens: int = 4096  # tokens per GPU in one training micro-batch
    decode_tokens: int = 32  # tokens per device per decode micro-batch (the paper's example)
    decode_microbatches: int = 2  # micro-batches overlapped per decode layer (the paper: 2)
    switch_usd: float | None = None  # unit prices for the topology costs; None = not priced
    link_usd: float | None = None
    slim_fly_q: int | None = None  # Slim Fly q; None = the largest prime power that fits the radix (an
    # explicit q is taken as given, prime power or not, as a cost model may)
    dragonfly_groups: int | None = None  # Dragonfly groups; None = the maximum, a h + 1

    def __post_init__(self) -> None:
        for name in _POSITIVE_INTS:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("nic_gbps", "scale_up_gbytes_per_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.nic_efficiency <= 1:
            raise ConfigError(f"nic_efficiency must lie in (0, 1], got {self.nic_efficiency}")
        if self.switch_radix < 4 or self.switch_radix % 2:
            raise ConfigError(f"switch_radix must be an even number >= 4, got {self.switch_radix}")
        for name in ("dispatch_dtype", "combine_dtype"):
            if getattr(self, name) not in DTYPE_BYTES:
                raise ConfigError(
                    f"{name} must be one of {', '.join(DTYPE_BYTES)}, got {getattr(self, name)!r}"
                )
        if self.ep > self.gpus_per_node and self.ep % self.gpus_per_node:
            raise ConfigError(
                f"ep ({self.ep}) must fit in one node or span whole nodes (a multiple of "
                f"gpus_per_node={self.gpus_per_node})"
            )
        if self.decode_microbatches < 1:
            raise ConfigError(f"decode_microbatches must be >= 1, got {self.decode_microbatches}")
        for name in ("switch_usd", "link_usd"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} must be >= 0 or null, got {value}")
        if self.slim_fly_q is not None:
            if self.slim_fly_q < 2 or self.slim_fly_q % 4 == 2:
                raise ConfigError(
                    f"slim_fly_q must be >= 2 and 4w + delta (delta in -1, 0, 1) or null, got {self.slim_fly_q}"
                )
            ports = sum(slim_fly_shape(self.slim_fly_q)[1:])
            if ports > self.switch_radix:
                raise ConfigError(
                    f"slim_fly_q={self.slim_fly_q} needs {ports} ports per router, over switch_radix={self.switch_radix}"
                )
        if self.dragonfly_groups is not None:
            h = dragonfly_h(self.switch_radix)
            if not 2 <= self.dragonfly_groups <= 2 * h * h + 1:
                raise ConfigError(
                    f"dragonfly_groups must lie in [2, {2 * h * h + 1}] for radix {self.switch_radix}, "
                    f"got {self.dragonfly_groups}"
                )

    @property
    def nic_bytes_per_s(self) -> float:
        return self.nic_gbps * GBIT_BYTES * self.nic_efficiency

    @property
    def scale_up_bytes_per_s(self) -> float:
        return self.scale_up_gbytes_per_s * GB

    @property
    def ep_nodes(self) -> int:
        """Nodes (scale-up domains) one EP group spans."""
        return max(1, self.ep // self.gpus_per_node)


def network_config_from_dict(values: Mapping[str, Any]) -> NetworkConfig:
    """Build the NetworkConfig a conf/network/*.yaml describes.

    Unknown keys and values of the wrong type fail (`build_config`) with one ConfigError naming
    `network.<field>`, as do the checks of `NetworkConfig.__post_init__`.
    """
    return build_config(NetworkConfig, values, "network")
