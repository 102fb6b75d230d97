"""Expert-parallel (EP) traffic of a DeepSeek-V3-style MoE layer over a cluster's network: the bytes one
token moves, whether DualPipe's overlap hides them in training, and the decode speed they bound.
Pure arithmetic, no torch; the network is a `network_config.NetworkConfig`.

    ep_traffic(model_cfg, net)                 # bytes per token and MoE layer, NIC and scale-up legs
    overlap_check(model_cfg, net, cluster)     # all-to-all vs compute per layer and micro-batch
    decode_bound_for(model_cfg, net)           # tokens/s when decoding waits on the all-to-all

"The paper" is "Insights into DeepSeek-V3" (ISCA 2025, arXiv 2505.09343); the decode bound is its
section 2.3.2. DeepEP's README gives the effective bandwidths the defaults use.

EP traffic per token and MoE layer, forward
-------------------------------------------
One token copy carries the hidden state: dispatch in FP8 (1 byte per value plus one FP32 scale per
1 x 128 tile, V3's activation quantization) or BF16, combine in BF16 (2 bytes; V3 keeps combine in
BF16). Node-limited routing (V3: the 256 experts are 8 groups, one group per node, and a token
keeps `topk_group` = 4 groups) sends a token over the NIC once per target node, however many of its
experts live there; the receiving GPU forwards it over the scale-up link (NVLink) to each expert's
GPU. So, with the EP group spanning `nodes` nodes:

    nodes per token   M = min(k, nodes, topk_group * ceil(nodes / n_group))   (k = num_experts_per_tok;
                          no group limit under topk_method "greedy": min(k, nodes))
    scale-out copies  min(M, nodes - 1)  (upper bound: every target node is remote)
    scale-up copies   k                  (upper bound: no target expert sits on the receiving GPU)
    bytes             copies x (dispatch bytes + combine bytes)

An EP group inside one scale-up domain (ep <= gpus_per_node, e.g. GB200 NVL72) sends nothing over
the NIC. Shared experts are computed where the token is and move nothing.

Whether DualPipe hides it
-------------------------
DualPipe overlaps the forward chunk of one micro-batch with the backward chunk of another, so one
MoE layer's forward all-to-all (dispatch + combine) and its backward all-to-all (the same volume:
V3 sends the activation gradient before the down-projection in FP8 and keeps the backward combine in
BF16) travel while that layer's forward + backward compute runs. Per layer and micro-batch of T
tokens per GPU:

    comm     = 2 x T x max(scale-out bytes / NIC B/s, scale-up bytes / scale-up B/s)
               (the NIC and NVLink legs of DeepEP's dispatch run concurrently; the slower one bounds)
    compute  = T x (training FLOPs of one MoE block per token) / (peak_tflops x mfu)
    hidden   when comm <= compute

The block's FLOPs come from `platform.plan.accounting.estimate` (its convention: 6 N_matmul + causal
attention, at the model's seq_len).

The decode bound (the paper's section 2.3.2)
--------------------------------------------
Each device serves `decode_tokens` tokens per micro-batch; each token's hidden state goes to every
expert it uses (k routed + the shared ones, 9 for V3) and comes back:

    per exchange  = tokens x destinations x hidden x (dispatch + combine bytes per value) / link B/s
    per layer     = decode_microbatches x per exchange   (two micro-batches overlapped: compute hides
                                                           under communication, the link is busy)
    per token     = layers x per layer;  tokens/s = 1 / per token

The link is the NIC when the EP group spans several nodes, the scale-up link when it fits in one
domain. The paper counts all 61 layers of V3 with hidden "7K" and no FP8 scales; this module counts
the MoE layers (58), the model's hidden size (7,168) and the scales when `fp8_scales` is set.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from moeforge.model.config import ModelConfig
from moeforge.platform.config.builder import ConfigError
from moeforge.platform.plan.accounting import ClusterConfig, estimate
from moeforge.platform.plan.network_config import DTYPE_BYTES, NetworkConfig

FP8_TILE = 128  # V3 quantizes activations per 1 x 128 tile ...
FP8_SCALE_BYTES = 4  # ... with one FP32 scale each


def bytes_per_value(dtype: str, fp8_scales: bool = True) -> float:
    """Wire bytes per hidden value: FP8 is 1 byte (+ 4/128 for the FP32 tile scale), BF16 is 2."""
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    extra = FP8_SCALE_BYTES / FP8_TILE if dtype == "fp8" and fp8_scales else 0.0
    return DTYPE_BYTES[dtype] + extra


@dataclass(frozen=True)
class EPTraffic:
    """What one token moves in one MoE layer's forward pass (dispatch + combine)."""

    hidden_size: int
    dispatch_bytes: float  # one copy, dispatch
    combine_bytes: float  # one copy, combine
    experts_per_token: int  # k routed experts
    ep: int
    ep_nodes: int
    nodes_per_token: int  # M: at most this many nodes hold a token's experts
    scale_out_copies: int  # copies over the NIC (upper bound)
    scale_up_copies: int  # copies over the scale-up link (upper bound)

    @property
    def copy_bytes(self) -> float:
        return self.dispatch_bytes + self.combine_bytes

    @property
    def scale_out_bytes(self) -> float:
        return self.scale_out_copies * self.copy_bytes

    @property
    def scale_up_bytes(self) -> float:
        return self.scale_up_copies * self.copy_bytes

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(scale_out_bytes=self.scale_out_bytes, scale_up_bytes=self.scale_up_bytes)
        return out


def nodes_per_token(cfg: ModelConfig, nodes: int) -> int:
    """M, the most nodes one token's routed experts can sit on when the EP group spans `nodes` nodes
    and the experts are laid out group by group (V3: one group of 32 experts per node)."""
    k = cfg.num_experts_per_tok
    if cfg.topk_method == "greedy":  # no group limit
        return min(k, nodes)
    groups_per_token_nodes = cfg.topk_group * math.ceil(nodes / cfg.n_group)
    return min(k, nodes, groups_per_token_nodes)


def ep_traffic(cfg: ModelConfig, net: NetworkConfig) -> EPTraffic:
    """Per-token forward EP traffic of one MoE layer of `cfg` under `net` (module docstring)."""
    if cfg.n_routed_experts % net.ep:
        raise ConfigError(
            f"network.ep ({net.ep}) must divide model.n_routed_experts ({cfg.n_routed_experts})"
        )
    dispatch = cfg.hidden_size * bytes_per_value(net.dispatch_dtype, net.fp8_scales)
    combine = cfg.hidden_size * bytes_per_value(net.combine_dtype, net.fp8_scales)
    nodes = net.ep_nodes
    if net.ep == 1:  # every expert is local: nothing moves
        m, out_copies, up_copies = 1, 0, 0
    elif net.ep <= net.gpus_per_node:  # one scale-up domain
        m, out_copies, up_copies = 1, 0, cfg.num_experts_per_tok
    else:
        m = nodes_per_token(cfg, nodes)
        out_copies, up_copies = min(m, nodes - 1), cfg.num_experts_per_tok
    return EPTraffic(
        hidden_size=cfg.hidden_size,
        dispatch_bytes=dispatch,
        combine_bytes=combine,
        experts_per_token=cfg.num_experts_per_tok,
        ep=net.ep,
        ep_nodes=nodes,
        nodes_per_token=m,
        scale_out_copies=out_copies,
        scale_up_copies=up_copies,
    )


def moe_block_train_flops(cfg: ModelConfig) -> float:
    """Training FLOPs per token of one MoE block (forward + backward), by
    `platform.plan.accounting.estimate`'s count: the estimate of the model cut right after an MoE block
    minus the estimate cut right before it (everything else -- embedding, head, the other blocks --
    cancels)."""
    first = next(i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
    j = first + cfg.moe_layer_freq  # also an MoE layer, and j >= 1 so the shorter model is valid
    longer = estimate(cfg.replace(num_hidden_layers=j + 1)).train_flops_per_token
    shorter = estimate(cfg.replace(num_hidden_layers=j)).train_flops_per_token
    return longer - shorter


@dataclass(frozen=True)
class OverlapCheck:
    """One MoE layer and one micro-batch of `tokens` per GPU, as DualPipe overlaps it."""

    tokens: int
    scale_out_s: float  # forward all-to-all, NIC leg
    scale_up_s: float  # forward all-to-all, scale-up leg
    comm_s: float  # forward + backward all-to-all: 2 x max(legs)
    compute_s: float  # forward + backward compute of the layer
    achieved_tflops: float  # peak_tflops x mfu per GPU
    moe_layers: int

    @property
    def hidden(self) -> bool:
        return self.comm_s <= self.compute_s

    @property
    def ratio(self) -> float:
        """comm / compute (<= 1: hidden)."""
        return self.comm_s / self.compute_s

    @property
    def exposed_s(self) -> float:
        """Communication left over per micro-batch through all MoE layers."""
        return max(0.0, self.comm_s - self.compute_s) * self.moe_layers

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(
            hidden=self.hidden,
            ratio=self.ratio,
            comm_all_layers_s=self.comm_s * self.moe_layers,
            compute_all_layers_s=self.compute_s * self.moe_layers,
            exposed_s=self.exposed_s,
        )
        return out


def overlap_check(cfg: ModelConfig, net: NetworkConfig, cluster: ClusterConfig) -> OverlapCheck:
    """Whether one MoE layer's all-to-all hides under its compute for a micro-batch of
    `net.microbatch_tokens` tokens per GPU, at `cluster.peak_tflops x cluster.mfu`."""
    traffic = ep_traffic(cfg, net)
    t = net.microbatch_tokens
    out_s = t * traffic.scale_out_bytes / net.nic_bytes_per_s
    up_s = t * traffic.scale_up_bytes / net.scale_up_bytes_per_s
    achieved = cluster.peak_tflops * cluster.mfu
    compute_s = t * moe_block_train_flops(cfg) / (achieved * 1e12)
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    return OverlapCheck(t, out_s, up_s, 2 * max(out_s, up_s), compute_s, achieved, moe_layers)


@dataclass(frozen=True)
class DecodeBound:
    """Per-token time and tokens/s when decoding is bound by the EP all-to-all (paper section 2.3.2)."""

    tokens: int
    destinations: int
    hidden_size: int
    dispatch_bytes_per_value: float
    combine_bytes_per_value: float
    layers: int
    link_bytes_per_s: float
    link: str  # "scale_out" (NIC) or "scale_up"
    microbatches: int

    @property
    def exchange_s(self) -> float:
        """One micro-batch's dispatch + combine."""
        per_value = self.dispatch_bytes_per_value + self.combine_bytes_per_value
        return self.tokens * self.destinations * self.hidden_size * per_value / self.link_bytes_per_s

    @property
    def layer_s(self) -> float:
        return self.microbatches * self.exchange_s

    @property
    def token_s(self) -> float:
        """Time per output token (TPOT)."""
        return self.layers * self.layer_s

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.token_s

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(
            exchange_s=self.exchange_s,
            layer_s=self.layer_s,
            token_s=self.token_s,
            tokens_per_s=self.tokens_per_s,
        )
        return out


def decode_bound_for(cfg: ModelConfig, net: NetworkConfig) -> DecodeBound:
    """The paper's bound with this model's numbers: k routed + shared experts per token, its hidden
    size, its MoE layers, FP8 scales if `net.fp8_scales`; over the NIC when EP spans nodes, else
    over the scale-up link."""
    scale_out = net.ep > net.gpus_per_node
    return DecodeBound(
        tokens=net.decode_tokens,
        destinations=cfg.num_experts_per_tok + cfg.n_shared_experts,
        hidden_size=cfg.hidden_size,
        dispatch_bytes_per_value=bytes_per_value(net.dispatch_dtype, net.fp8_scales),
        combine_bytes_per_value=bytes_per_value(net.combine_dtype, net.fp8_scales),
        layers=sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)),
        link_bytes_per_s=net.nic_bytes_per_s if scale_out else net.scale_up_bytes_per_s,
        link="scale_out" if scale_out else "scale_up",
        microbatches=net.decode_microbatches,
    )
