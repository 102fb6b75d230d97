"""Parameter, FLOP and KV-cache accounting from a model config: pure arithmetic, no torch.

What is counted, and why (the conventions reproduce DeepSeek's published comparison, "Insights
into DeepSeek-V3", tables on KV cache and training cost per token at sequence length 4096):

* total parameters: every parameter of the main model (embedding, blocks, final norm, head).
  The multi-token-prediction (MTP) module is reported separately (`mtp_params`, its unique
  parameters; the embedding and output head it shares are not counted twice), as DeepSeek quotes
  671B for V3 without its 11.5B-unique MTP module. The router's correction bias is a buffer in
  moeforge (updated by the balancing rule, not by gradients), so it is not a parameter here.
* activated parameters per token: what one token multiplies with. The input embedding is a
  table lookup and is left out; the output head is a matmul and is counted. DeepSeek-V3: 36.6B,
  which is DeepSeek's 36.7B ("37B"); counting the embedding as well would give 37.5B.
* training FLOPs per token (forward + backward = 3 x forward):

      6 * N_matmul  +  3 * L * s * H * (d_qk + d_v)

  N_matmul is the activated weight-matrix parameters (attention projections, dense or routed +
  shared expert FFNs, router, output head; no norms, biases or embedding lookup). The second term
  is attention's score and context products: per layer and token the forward pass does
  QK^T (2 * d_qk FLOPs per key per head) and PV (2 * d_v per key per head) against, with a causal
  mask, s/2 keys on average, i.e. 2 * (s/2) * H * (d_qk + d_v); times 3 for training. This
  causal-halved convention reproduces DeepSeek-V3 (250), DeepSeek-V2 (155) and LLaMA-3.1-405B
  (2,448 GFLOPs) within 1%; counting the full s x s matrix would overshoot V3 by 12%, and no
  convention reproduces the published 394 GFLOPs for Qwen2.5-72B: 6 x its non-embedding
  parameters alone is already 421 GFLOPs (docs/estimating.md has the table).
  The MTP module's FLOPs (one more block, its projection and the shared head) are reported
  separately and added in the training-cost estimate, because moeforge trains with it.
* KV cache per token, BF16 (2 bytes): MLA caches the compressed latent and the shared RoPE key,
  (kv_lora_rank + qk_rope_head_dim) per layer; GQA caches K and V, 2 * kv_heads * head_dim per
  layer.
* training state: 16 bytes per parameter (BF16 weight and gradient, FP32 master weight and the
  two AdamW moments), main model plus MTP; activations come on top.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moeforge.model.config import ModelConfig
from moeforge.platform.config.arch import ARCH_DEEPSEEK_V3, ARCH_DENSE_GQA
from moeforge.platform.config.builder import ConfigError, build_config

KV_CACHE_BYTES_PER_VALUE = 2  # BF16 cache
TRAIN_STATE_BYTES_PER_PARAM = 16  # bf16 weight + bf16 grad + fp32 master + fp32 Adam m, v
TRAIN_FLOPS_PER_MATMUL_PARAM = 6  # 2 (multiply-add) * 3 (forward + two backward products)


# ------------------------------------------------------------------------------------------------
# Dense grouped-query-attention baselines (Qwen2.5, LLaMA-3.1)
# ------------------------------------------------------------------------------------------------
@dataclass
class DenseGQAConfig:
    """A dense decoder with grouped-query attention and a SwiGLU MLP, for comparison only.

    Field names follow the Hugging Face Llama / Qwen2 `config.json`. `attention_bias` is the
    Q/K/V projection bias that Qwen2 has and LLaMA has not.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    seq_len: int = 4096

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int):
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise ConfigError(f"{f.name} must be a positive integer, got {value!r}")
            elif not isinstance(value, bool):
                raise ConfigError(f"{f.name} must be true or false, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """Per-token accounting of one model. FLOPs are training FLOPs (forward + backward)."""

    name: str
    arch: str
    seq_len: int
    total_params: int  # main model; MTP excluded
    active_params: int  # per token; input embedding excluded, output head included
    embedding_params: int  # the input embedding table
    matmul_active_params: int  # activated weight matrices, the 6N of the FLOP formula
    mtp_params: int  # MTP modules' unique parameters (embedding and head are shared)
    mtp_active_params: int  # MTP per token, shared output head included
    train_flops_per_token: float  # main model, attention included
    attention_flops_per_token: float  # the attention-product part of the line above
    mtp_train_flops_per_token: float  # extra for the MTP modules
    kv_cache_bytes_per_token: int

    @property
    def train_gflops_per_token(self) -> float:
        return self.train_flops_per_token / 1e9

    @property
    def run_flops_per_token(self) -> float:
        """What a training step computes per token: the main model and the MTP modules (for MFU and
        GPU-hours)."""
        return self.train_flops_per_token + self.mtp_train_flops_per_token

    @property
    def train_state_bytes(self) -> int:
        return (self.total_params + self.mtp_params) * TRAIN_STATE_BYTES_PER_PARAM

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["train_gflops_per_token"] = self.train_gflops_per_token
        out["mtp_train_gflops_per_token"] = self.mtp_train_flops_per_token / 1e9
        out["train_state_bytes"] = self.train_state_bytes
        return out


@dataclass
class ClusterConfig:
    """The hardware a token budget is priced on.

    `peak_tflops` is per GPU. The default, 989, is the dense BF16 peak of an H800 / H100 / H200
    SXM; their dense FP8 peak is 1979. `mfu` is the achieved fraction of that peak.
    DeepSeek-V3's reported 2.664M H800-hours for 14.8T pre-training tokens correspond to about
    0.40 of the BF16 peak (0.20 of the FP8 peak) under this module's FLOP count.
    """

    gpus: int = 2048
    peak_tflops: float = 989.0
    mfu: float = 0.40
    price_per_gpu_hour: float = 2.0

    def __post_init__(self) -> None:
        # Types are checked by build_config (moeforge-estimate builds it from `cluster.*`).
        if self.gpus <= 0:
            raise ConfigError(f"gpus must be positive, got {self.gpus}")
        if not self.peak_tflops > 0:
            raise ConfigError(f"peak_tflops must be positive, got {self.peak_tflops}")
        if not 0 < self.mfu <= 1:
            raise ConfigError(f"mfu must lie in (0, 1], got {self.mfu}")
        if self.price_per_gpu_hour < 0:
            raise ConfigError(f"price_per_gpu_hour must be >= 0, got {self.price_per_gpu_hour}")


@dataclass(frozen=True)
class TrainingCost:
    tokens: float
    flops: float  # tokens * (main + MTP) training FLOPs per token
    gpu_hours: float
    days: float  # wall clock on cluster.gpus
    cost: float  # gpu_hours * price_per_gpu_hour
    cluster: ClusterConfig

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------
# Counting
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Block:
    """One transformer block: weight-matrix parameters (all / per token) and the rest (norms, biases)."""

    matmul_total: int
    matmul_active: int
    other: int
    attention_flops_fwd: int  # per token, causal: 2 * (s/2) * H * (d_qk + d_v)

    @property
    def total(self) -> int:
        return self.matmul_total + self.other

    @property
    def active(self) -> int:
        return self.matmul_active + self.other


def _mla_block(cfg: ModelConfig, layer_idx: int, seq_len: int) -> _Block:
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank is None:
        q_matmul, q_other = h * heads * cfg.qk_head_dim, 0
    else:  # q_a_proj, q_a_layernorm, q_b_proj
        q_matmul = h * cfg.q_lora_rank + cfg.q_lora_rank * heads * cfg.qk_head_dim
        q_other = cfg.q_lora_rank + (cfg.q_lora_rank if cfg.attention_bias else 0)
    kv_matmul = (
        h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # kv_a_proj_with_mqa
        + cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # kv_b_proj
    )
    kv_other = cfg.kv_lora_rank + ((cfg.kv_lora_rank + cfg.qk_rope_head_dim) if cfg.attention_bias else 0)
    o_matmul, o_other = heads * cfg.v_head_dim * h, (h if cfg.attention_bias else 0)
    attn = q_matmul + kv_matmul + o_matmul
    other = q_other + kv_other + o_other + 2 * h  # + input and post-attention RMSNorm

    if cfg.is_moe_layer(layer_idx):
        expert = 3 * h * cfg.moe_intermediate_size  # SwiGLU gate, up, down
        router = cfg.n_routed_experts * h
        ffn_total = (cfg.n_routed_experts + cfg.n_shared_experts) * expert + router
        ffn_active = (cfg.num_experts_per_tok + cfg.n_shared_experts) * expert + router
    else:
        ffn_total = ffn_active = 3 * h * cfg.intermediate_size
    attention_flops = seq_len * heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return _Block(attn + ffn_total, attn + ffn_active, other, attention_flops)


def largest_block_tensor(cfg: ModelConfig, layer_idx: int) -> int:
    """Elements of the largest single weight tensor of block `layer_idx` as a checkpoint stores it
    (one routed expert's matrix at a time; the shared experts' matrices as one). Layer ids >=
    num_hidden_layers are MTP blocks."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank is None:
        q = [h * heads * cfg.qk_head_dim]
    else:
        q = [h * cfg.q_lora_rank, cfg.q_lora_rank * heads * cfg.qk_head_dim]
    kv = [h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim), cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)]
    attn = [*q, *kv, heads * cfg.v_head_dim * h]
    if cfg.is_moe_layer(layer_idx):
        ffn = [h * cfg.moe_intermediate_size, h * cfg.moe_intermediate_size * cfg.n_shared_experts, cfg.n_routed_experts * h]
    else:
        ffn = [h * cfg.intermediate_size]
    return max(attn + ffn)


def routed_expert_params(cfg: ModelConfig, layer_idx: int) -> int:
    """Parameters of the routed experts of block `layer_idx` (0 for a dense block): the part expert
    parallelism splits over ranks. Layer ids >= num_hidden_layers are MTP blocks."""
    if not cfg.is_moe_layer(layer_idx):
        return 0
    return cfg.n_routed_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size


def block_params(cfg: ModelConfig, layer_idx: int) -> int:
    """All parameters of block `layer_idx` (attention, norms, dense MLP or router + shared + routed
    experts), as `estimate` counts them. Layer ids >= num_hidden_layers are MTP blocks."""
    return _mla_block(cfg, layer_idx, cfg.seq_len).total


def mtp_module_params(cfg: ModelConfig, depth: int) -> int:
    """Unique parameters of MTP module `depth` (1-based): enorm, hnorm, eh_proj [h, 2h], its block and
    its final norm; the embedding and the output head it uses are the main model's."""
    h = cfg.hidden_size
    return 2 * h + 2 * h * h + block_params(cfg, cfg.num_hidden_layers + depth - 1) + h


def _gqa_block(cfg: DenseGQAConfig) -> _Block:
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    attn = h * q + 2 * h * kv + q * h  # q, k, v, o projections
    bias = (q + 2 * kv) if cfg.attention_bias else 0
    mlp = 3 * h * cfg.intermediate_size
    attention_flops = cfg.seq_len * cfg.num_attention_heads * (d + d)
    return _Block(attn + mlp, attn + mlp, bias + 2 * h, attention_flops)


def _train_flops(matmul_active: int, attention_fwd: int) -> tuple[float, float]:
    attention = 3.0 * attention_fwd
    return TRAIN_FLOPS_PER_MATMUL_PARAM * float(matmul_active) + attention, attention


def estimate(cfg: ModelConfig | DenseGQAConfig, name: str = "") -> Estimate:
    """Account for `cfg` at its own `seq_len` (4096 for the published models)."""
    if isinstance(cfg, DenseGQAConfig):
        return _estimate_dense(cfg, name)
    return _estimate_mla(cfg, name)


def _estimate_mla(cfg: ModelConfig, name: str) -> Estimate:
    h, vocab, s = cfg.hidden_size, cfg.vocab_size, cfg.seq_len
    embedding = vocab * h
    head = 0 if cfg.tie_word_embeddings else vocab * h
    blocks = [_mla_block(cfg, i, s) for i in range(cfg.num_hidden_layers)]
    total = embedding + sum(b.total for b in blocks) + h + head  # + final norm
    matmul_active = sum(b.matmul_active for b in blocks) + vocab * h  # head matmul, tied or not
    active = matmul_active + sum(b.other for b in blocks) + h
    attention_fwd = sum(b.attention_flops_fwd for b in blocks)
    flops, attention = _train_flops(matmul_active, attention_fwd)

    # Each MTP depth k: enorm, hnorm, eh_proj [h, 2h], one block (layer id L + k, as in the
    # published checkpoint) and its final norm; embedding and output head are the main model's.
    mtp_total = mtp_matmul = mtp_other = mtp_attention = 0
    for k in range(cfg.num_nextn_predict_layers):
        block = _mla_block(cfg, cfg.num_hidden_layers + k, s)
        mtp_total += 2 * h + 2 * h * h + block.total + h
        mtp_matmul += 2 * h * h + block.matmul_active + vocab * h
        mtp_other += 3 * h + block.other
        mtp_attention += block.attention_flops_fwd
    mtp_flops, _ = _train_flops(mtp_matmul, mtp_attention)

    kv_bytes = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * KV_CACHE_BYTES_PER_VALUE
    return Estimate(
        name=name,
        arch=ARCH_DEEPSEEK_V3,
        seq_len=s,
        total_params=total,
        active_params=active,
        embedding_params=embedding,
        matmul_active_params=matmul_active,
        mtp_params=mtp_total,
        mtp_active_params=mtp_matmul + mtp_other,
        train_flops_per_token=flops,
        attention_flops_per_token=attention,
        mtp_train_flops_per_token=mtp_flops if cfg.num_nextn_predict_layers else 0.0,
        kv_cache_bytes_per_token=kv_bytes,
    )


def _estimate_dense(cfg: DenseGQAConfig, name: str) -> Estimate:
    h, vocab = cfg.hidden_size, cfg.vocab_size
    block = _gqa_block(cfg)
    layers = cfg.num_hidden_layers
    embedding = vocab * h
    head = 0 if cfg.tie_word_embeddings else vocab * h
    total = embedding + layers * block.total + h + head
    matmul_active = layers * block.matmul_active + vocab * h
    active = matmul_active + layers * block.other + h
    flops, attention = _train_flops(matmul_active, layers * block.attention_flops_fwd)
    kv_bytes = 2 * cfg.num_key_value_heads * cfg.head_dim * layers * KV_CACHE_BYTES_PER_VALUE
    return Estimate(
        name=name,
        arch=ARCH_DENSE_GQA,
        seq_len=cfg.seq_len,
        total_params=total,
        active_params=active,
        embedding_params=embedding,
        matmul_active_params=matmul_active,
        mtp_params=0,
        mtp_active_params=0,
        train_flops_per_token=flops,
        attention_flops_per_token=attention,
        mtp_train_flops_per_token=0.0,
        kv_cache_bytes_per_token=kv_bytes,
    )


def training_cost(est: Estimate, tokens: float, cluster: ClusterConfig) -> TrainingCost:
    """GPU-hours, wall-clock days and price of training `est` (main model + MTP) on `tokens`."""
    if isinstance(tokens, bool) or not isinstance(tokens, (int, float)) or not tokens > 0:
        raise ConfigError(f"tokens must be a positive number, got {tokens!r}")
    flops = float(tokens) * est.run_flops_per_token
    gpu_seconds = flops / (cluster.peak_tflops * 1e12 * cluster.mfu)
    gpu_hours = gpu_seconds / 3600.0
    return TrainingCost(
        tokens=float(tokens),
        flops=flops,
        gpu_hours=gpu_hours,
        days=gpu_hours / cluster.gpus / 24.0,
        cost=gpu_hours * cluster.price_per_gpu_hour,
        cluster=cluster,
    )


# ------------------------------------------------------------------------------------------------
# Building configs from Hydra / YAML values
# ------------------------------------------------------------------------------------------------
def model_config_from_dict(values: Mapping[str, Any]) -> ModelConfig | DenseGQAConfig:
    """Build the config a model YAML describes; its `arch` key picks the class.

    Unknown keys, missing fields and values of the wrong type fail (`build_config`) with one
    ConfigError naming `model.<field>`.
    """
    values = dict(values)
    arch = values.pop("arch", ARCH_DEEPSEEK_V3)
    classes = {ARCH_DEEPSEEK_V3: ModelConfig, ARCH_DENSE_GQA: DenseGQAConfig}
    if arch not in classes:
        raise ConfigError(f"model.arch must be one of {sorted(classes)}, got {arch!r}")
    return build_config(classes[arch], values, "model")


# ------------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------------
def _si(n: float, unit: str = "", top: float = 1e12) -> str:
    """`n` with a thousands prefix no larger than `top`: 671.03 B, 2.07 M, 2,473.22 GFLOPs."""
    for scale, prefix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale and scale <= top:
            return f"{n / scale:,.2f} {prefix}{unit}"
    return f"{n:,.0f} {unit}".rstrip()


def format_table(est: Estimate, cost: TrainingCost | None = None) -> str:
    """A human-readable, aligned report of `est` (and of `cost` when a token budget was given)."""
    matmul_flops = TRAIN_FLOPS_PER_MATMUL_PARAM * est.matmul_active_params
    rows = [
        ("model", f"{est.name or '-'}  [arch={est.arch}]"),
        ("total parameters", f"{_si(est.total_params)}  ({est.total_params:,})"),
        ("activated parameters / token", f"{_si(est.active_params)}  (input embedding excluded)"),
        ("embedding parameters", _si(est.embedding_params)),
    ]
    if est.mtp_params:
        rows.append(
            (
                "MTP (not counted above)",
                f"{_si(est.mtp_params)} unique, {_si(est.mtp_active_params)} activated",
            )
        )
    rows.append(
        (
            f"training FLOPs / token, s={est.seq_len}",
            (
                f"{_si(est.train_flops_per_token, 'FLOPs', 1e9)}  (6N {_si(matmul_flops, 'FLOPs', 1e9)}"
                f" + attention {_si(est.attention_flops_per_token, 'FLOPs', 1e9)})"
            ),
        )
    )
    if est.mtp_params:
        rows.append(("  + MTP", _si(est.mtp_train_flops_per_token, "FLOPs", 1e9)))
    rows += [
        ("KV cache / token (BF16)", f"{est.kv_cache_bytes_per_token:,} bytes"),
        ("training state (16 B / param)", f"{_si(est.train_state_bytes, 'B')}  (+ activations)"),
    ]
    if cost is not None:
        c = cost.cluster
        rows += [
            ("tokens", f"{_si(cost.tokens)}  ({cost.flops:.3e} FLOPs, MTP included)"),
            ("cluster", f"{c.gpus} GPUs x {c.peak_tflops:g} TFLOP/s peak x {c.mfu:g} MFU"),
            ("GPU-hours", _si(cost.gpu_hours)),
            ("wall clock", f"{cost.days:,.1f} days"),
            ("cost", f"${_si(cost.cost)}  at ${c.price_per_gpu_hour:g} / GPU-hour"),
        ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)
