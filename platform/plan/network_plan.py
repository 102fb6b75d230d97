"""The network plan of a training cluster: expert-parallel traffic, whether DualPipe hides it, the
switch fabric that carries it, and the decode-speed bound it sets -- composed for moeforge-estimate's
network section (table and JSON). Pure arithmetic, no torch.

    net = network_config_from_dict(yaml_values)                     # conf/network/*.yaml
    plan = plan_network(model_cfg, cluster, net, name="h800_ib")    # moeforge-estimate network=...
    format_network(plan), plan.to_dict()

The pieces, one job each (in the plan room):
    network_config       NetworkConfig: the network, EP precision and workload, validated
    network_traffic      EP bytes per token (node-limited routing), the DualPipe overlap check,
                         the decode bound; each formula with its source
    network_fabrics      FT2, MPFT, FT3, Slim Fly and Dragonfly sizes from the switch radix, and costs
    network_plan         this module: the plan that composes them, its table and its JSON

Sources. "The paper" is DeepSeek's "Insights into DeepSeek-V3: Scaling Challenges and Reflections on
Hardware for AI Architectures" (ISCA 2025, arXiv 2505.09343): the H800 node (8 GPUs, one 400 Gb/s
CX7 InfiniBand NIC per GPU, NVLink), the multi-plane two-layer fat-tree (MPFT, one plane per GPU
index of a node), the topology comparison (its Table 3) and the decode bound (its section 2.3.2).
DeepEP's README gives the effective bandwidths: about 160 GB/s NVLink and 50 GB/s per 400 Gb/s NIC on
H800. The figures these modules reproduce, and where each differs, are listed in
`tests.test_network_plan`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from moeforge.model.config import ModelConfig
from moeforge.platform.plan.accounting import ClusterConfig
from moeforge.platform.plan.network_config import GB, NetworkConfig
from moeforge.platform.plan.network_fabrics import Fabric, fabrics
from moeforge.platform.plan.network_traffic import (
    DecodeBound,
    EPTraffic,
    OverlapCheck,
    decode_bound_for,
    ep_traffic,
    overlap_check,
)


@dataclass(frozen=True)
class NetworkPlan:
    """Everything the network section reports for one model, cluster and network config."""

    name: str
    config: NetworkConfig
    cluster_gpus: int
    traffic: EPTraffic | None  # None for a model without MoE layers
    overlap: OverlapCheck | None
    decode: DecodeBound | None  # None without MoE layers or with ep = 1
    fabrics: list[Fabric]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "config": dataclasses.asdict(self.config),
            "nic_bytes_per_s": self.config.nic_bytes_per_s,
            "scale_up_bytes_per_s": self.config.scale_up_bytes_per_s,
            "ep_traffic": None if self.traffic is None else self.traffic.to_dict(),
            "overlap": None if self.overlap is None else self.overlap.to_dict(),
            "decode": None if self.decode is None else self.decode.to_dict(),
            "fabrics": [
                {**f.to_dict(), "holds_cluster": f.endpoints >= self.cluster_gpus} for f in self.fabrics
            ],
        }


def plan_network(model: Any, cluster: ClusterConfig, net: NetworkConfig, name: str = "") -> NetworkPlan:
    """The whole plan. A model without MoE layers (a dense baseline) gets the fabric sizing only."""
    moe = isinstance(model, ModelConfig) and model.has_moe
    traffic = ep_traffic(model, net) if moe else None
    return NetworkPlan(
        name=name,
        config=net,
        cluster_gpus=cluster.gpus,
        traffic=traffic,
        overlap=overlap_check(model, net, cluster) if moe else None,
        decode=decode_bound_for(model, net) if moe and net.ep > 1 else None,  # ep=1 moves nothing
        fabrics=fabrics(net),
    )


def _kb(n: float) -> str:
    return f"{n / 1e3:,.2f} kB"


def _time(s: float) -> str:
    if s == 0:
        return "0"
    for scale, unit in ((1.0, "s"), (1e-3, "ms")):
        if s >= scale:
            return f"{s / scale:,.2f} {unit}"
    return f"{s * 1e6:,.2f} us"


def _usd(x: float | None, unit: float, suffix: str) -> str:
    return "-" if x is None else f"${x / unit:,.2f}{suffix}"


def format_network(plan: NetworkPlan) -> str:
    """The plan as an aligned section, in the form of the estimate's table."""
    c = plan.config
    rows = [
        (
            "network",
            (
                f"{plan.name or '-'}: {c.gpus_per_node} GPUs / scale-up domain, NIC {c.nic_gbps:g} Gb/s per GPU "
                f"({c.nic_bytes_per_s / GB:g} GB/s), scale-up {c.scale_up_gbytes_per_s:g} GB/s, "
                f"radix-{c.switch_radix} switches, {c.planes} planes"
            ),
        )
    ]
    t, o, d = plan.traffic, plan.overlap, plan.decode
    if t is None:
        rows.append(("EP all-to-all", "none (no MoE layers)"))
    else:
        if t.ep == 1:
            where = "all experts local"
        elif t.scale_out_copies == 0:
            where = "inside one scale-up domain"
        else:
            where = f"over {t.ep_nodes} nodes, <= {t.nodes_per_token} nodes per token"
        rows += [
            (
                "EP bytes / token / MoE layer",
                (
                    f"dispatch {c.dispatch_dtype.upper()} {t.dispatch_bytes:,.0f} B + combine "
                    f"{c.combine_dtype.upper()} {t.combine_bytes:,.0f} B per copy; ep={t.ep} {where}"
                ),
            ),
            ("  scale-out (NIC)", f"<= {t.scale_out_copies} copies: {_kb(t.scale_out_bytes)} forward"),
            ("  scale-up", f"<= {t.scale_up_copies} copies: {_kb(t.scale_up_bytes)} forward"),
            (
                f"micro-batch of {o.tokens:,} tokens",
                f"one MoE layer forward: NIC {_time(o.scale_out_s)}, scale-up {_time(o.scale_up_s)}",
            ),
            (
                "DualPipe overlap (F + B)",
                (
                    f"all-to-all {_time(o.comm_s)} vs compute {_time(o.compute_s)} at {o.achieved_tflops:g} "
                    f"TFLOP/s: {'hidden' if o.hidden else 'NOT hidden'} (ratio {o.ratio:.2f})"
                ),
            ),
            (
                f"  all {o.moe_layers} MoE layers",
                (
                    f"all-to-all {_time(o.comm_s * o.moe_layers)}, compute {_time(o.compute_s * o.moe_layers)}, "
                    f"exposed {_time(o.exposed_s)} per micro-batch"
                ),
            ),
        ]
        if d is None:
            rows.append(("decode bound", "none (ep=1: no all-to-all)"))
        else:
            rows += [
                (
                    "decode bound",
                    (
                        f"{d.tokens} tokens x {d.destinations} experts x {d.hidden_size:,} x "
                        f"({d.dispatch_bytes_per_value:g} + {d.combine_bytes_per_value:g}) B over "
                        f"{d.link_bytes_per_s / GB:g} GB/s ({d.link.replace('_', '-')})"
                    ),
                ),
                (
                    "  per token",
                    (
                        f"{_time(d.exchange_s)} / exchange, {_time(d.layer_s)} / layer ({d.microbatches} micro-batches), "
                        f"{d.layers} MoE layers: {_time(d.token_s)} / token, {d.tokens_per_s:,.1f} tokens/s"
                    ),
                ),
            ]
    header = (
        f"{'endpoints':>9}  {'switches':>8}  {'links':>9}  {'cost':>10}  {'/ endpoint':>10}  {'holds':>5}"
    )
    rows.append(
        (f"fabric, radix {c.switch_radix}", f"{header}  (holds: >= cluster.gpus={plan.cluster_gpus:,})")
    )
    for f in plan.fabrics:
        rows.append(
            (
                f"  {f.name}",
                (
                    f"{f.endpoints:>9,}  {f.switches:>8,}  {f.links:>9,}  {_usd(f.cost_usd, 1e6, 'M'):>10}  "
                    f"{_usd(f.cost_per_endpoint_usd, 1e3, 'k'):>10}  {'yes' if f.endpoints >= plan.cluster_gpus else 'no':>5}"
                    f"  ({f.description})"
                ),
            )
        )
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)
