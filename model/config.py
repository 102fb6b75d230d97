"""ModelConfig: every field of the published DeepSeek-V3 configuration, plus moeforge's training knobs.

Field names follow the Hugging Face `config.json` of deepseek-ai/DeepSeek-V3 so a checkpoint's config
maps onto this dataclass one to one (`ModelConfig.from_hf_dict`). Validation runs in `__post_init__`
and every error names the offending field, so a bad YAML fails before any work starts.

Checks raise ValueError naming the field; the platform's config builder
(`moeforge.platform.config.builder.build_config`) checks keys and types before construction and
turns these errors into ConfigError with the full path (`model.n_group ...`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RopeScaling:
    """YaRN context extension (DeepSeek-V3 trains at 4K, extends to 128K).

    Its error messages name fields relative to itself (`factor ...`); the config builder prefixes the
    path it is built at (`model.rope_scaling.factor ...`).

    `factor` stretches the rotary wavelengths; dimensions whose wavelength is shorter than
    original_max_position_embeddings / beta_fast are kept (extrapolated), those longer than
    .../beta_slow are fully interpolated, with a linear ramp between. `mscale` and `mscale_all_dim`
    set the attention-temperature correction 0.1*mscale*ln(factor)+1; the softmax scale is
    multiplied by its square when mscale_all_dim is non-zero, as in the published model.
    """

    type: str = "yarn"
    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0

    def __post_init__(self) -> None:
        if self.type != "yarn":
            raise ValueError(f"type: only 'yarn' is supported, got {self.type!r}")
        if not self.factor >= 1.0:
            raise ValueError(f"factor must be >= 1, got {self.factor}")
        if self.original_max_position_embeddings <= 0:
            raise ValueError(
                "original_max_position_embeddings must be positive, "
                f"got {self.original_max_position_embeddings}"
            )
        if not self.beta_fast > self.beta_slow > 0:
            raise ValueError(f"beta_fast ({self.beta_fast}) must exceed beta_slow ({self.beta_slow}) > 0")


# Fields that must be strictly positive integers; checked together so the message names the field.
_POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
    "max_position_embeddings",
)


@dataclass
class ModelConfig:
    """A DeepSeek-V3-family model. Defaults are the published 671B configuration."""

    # --- sizes -----------------------------------------------------------------------------------
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # FFN width of the dense layers
    moe_intermediate_size: int = 2048  # FFN width of each routed / shared expert
    num_hidden_layers: int = 61  # main-model transformer blocks (MTP blocks not counted)
    num_nextn_predict_layers: int = 1  # MTP depth D; 0 disables multi-token prediction

    # --- Multi-head Latent Attention ---------------------------------------------------------------
    num_attention_heads: int = 128
    num_key_value_heads: int = 128  # kept for HF parity; MLA has no KV-head grouping
    q_lora_rank: int | None = 1536  # None: full-rank query projection (V2-Lite style)
    kv_lora_rank: int = 512  # width of the compressed KV latent that the inference cache holds
    qk_rope_head_dim: int = 64  # decoupled RoPE key/query width, the key part shared across heads
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    attention_bias: bool = False
    attention_dropout: float = 0.0

    # --- DeepSeekMoE ----------------------------------------------------------------------------------
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8  # routed experts activated per token (top-k)
    n_group: int = 8  # expert groups for group-limited routing
    topk_group: int = 4  # groups kept per token
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) or "softmax" (V2)
    topk_method: str = "noaux_tc"  # "noaux_tc" (V3), "group_limited_greedy" (V2), "greedy"
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3  # the first k blocks use a dense MLP
    moe_layer_freq: int = 1
    ep_size: int = 1

    # --- auxiliary-loss-free balancing and losses ------------------------------------------------------
    bias_update_speed: float = 0.001  # gamma: bias += gamma * sign(mean_load - load); 0 freezes
    seq_aux_loss_alpha: float = 0.0001  # alpha of the complementary sequence-wise balance loss
    mtp_loss_weight: float = 0.3  # lambda (V3: 0.3 for the first 10T tokens, then 0.1)

    # --- positions -----------------------------------------------------------------------------------
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)

    # --- misc ----------------------------------------------------------------------------------------
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.006  # V3 initialises every weight with std 0.006
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    seq_len: int = 4096  # training sequence length (used by accounting and data packing)

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, Mapping):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        self._validate()

    # ------------------------------------------------------------------------------------------------
    def _validate(self) -> None:
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ValueError(f"q_lora_rank must be a positive integer or null, got {self.q_lora_rank!r}")
        if self.num_nextn_predict_layers < 0:
            raise ValueError(f"num_nextn_predict_layers must be >= 0, got {self.num_nextn_predict_layers}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even for rotary pairs, got {self.qk_rope_head_dim}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ValueError(
                f"first_k_dense_replace must lie in [0, num_hidden_layers={self.num_hidden_layers}], "
                f"got {self.first_k_dense_replace}"
            )
        if self.moe_layer_freq <= 0:
            raise ValueError(f"moe_layer_freq must be positive, got {self.moe_layer_freq}")
        if self.has_moe:
            self._validate_routing()
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ValueError(f"scoring_func must be 'sigmoid' or 'softmax', got {self.scoring_func!r}")
        if self.topk_method not in ("noaux_tc", "group_limited_greedy", "greedy"):
            raise ValueError(
                f"topk_method must be 'noaux_tc', 'group_limited_greedy' or 'greedy', got {self.topk_method!r}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act: only 'silu' (SwiGLU) is supported, got {self.hidden_act!r}")
        for name in ("bias_update_speed", "seq_aux_loss_alpha", "mtp_loss_weight", "attention_dropout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.initializer_range > 0:
            raise ValueError(f"initializer_range must be positive, got {self.initializer_range}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings: must be false (DeepSeek-V3 unties embedding and head)")
        if self.seq_len <= 0:
            raise ValueError(f"seq_len must be a positive integer, got {self.seq_len}")

    def _validate_routing(self) -> None:
        if self.n_routed_experts <= 0:
            raise ValueError(f"n_routed_experts must be positive for MoE layers, got {self.n_routed_experts}")
        if self.n_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if self.n_group <= 0:
            raise ValueError(f"n_group must be positive, got {self.n_group}")
        if self.n_routed_experts % self.n_group:
            raise ValueError(
                f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})"
            )
        if not 0 < self.topk_group <= self.n_group:
            raise ValueError(f"topk_group must lie in [1, n_group={self.n_group}], got {self.topk_group}")
        experts_in_kept_groups = self.topk_group * (self.n_routed_experts // self.n_group)
        if not 0 < self.num_experts_per_tok <= experts_in_kept_groups:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must lie in [1, {experts_in_kept_groups}]: "
                f"the experts in topk_group={self.topk_group} kept groups of "
                f"{self.n_routed_experts // self.n_group}"
            )
        if self.topk_method == "noaux_tc" and self.n_routed_experts // self.n_group < 2:
            raise ValueError(
                "n_group: noaux_tc routing scores a group by its top-2 experts, so each of the "
                f"n_group={self.n_group} groups needs >= 2 experts (n_routed_experts={self.n_routed_experts})"
            )

    # --- derived quantities ------------------------------------------------------------------------------
    @property
    def has_moe(self) -> bool:
        return any(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    def is_moe_layer(self, layer_idx: int) -> bool:
        """True when block `layer_idx` uses DeepSeekMoE rather than a dense MLP."""
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times YaRN's mscale^2 when the context is extended (as in the published model)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim and rs.factor > 1.0:
            mscale = 0.1 * rs.mscale_all_dim * math.log(rs.factor) + 1.0
            scale = scale * mscale * mscale
        return scale

    # --- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """Build from a Hugging Face DeepSeek-V3 `config.json`; HF-only bookkeeping keys are dropped.

        Reads both the published layout (`rope_scaling` + `rope_theta`) and transformers v5's
        `rope_parameters`. No rope entry, or rope_type "default", means plain RoPE (no YaRN); YaRN keys
        the file leaves out take Hugging Face's meaning (mscale absent = 0, factor absent =
        max_position_embeddings / original_max_position_embeddings). A value the model refuses raises
        ValueError naming the field."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in hf.items() if k in known}
        if "num_nextn_predict_layers" not in values and "num_mtp_layers" in hf:
            values["num_nextn_predict_layers"] = hf["num_mtp_layers"]
        if hf.get("rope_interleave") is False:
            raise ValueError("rope_interleave: only DeepSeek's interleaved rotary layout is supported")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        if "rope_theta" in rope:
            values["rope_theta"] = rope.pop("rope_theta")
        kind = rope.pop("rope_type", None) or rope.pop("type", None) or ("yarn" if rope else "default")
        rope.pop("type", None)
        if rope.get("truncate", True) is True:
            rope.pop("truncate", None)
        if kind == "default":
            values["rope_scaling"] = None
        else:
            unsupported = sorted(set(rope) - {f.name for f in dataclasses.fields(RopeScaling)})
            if unsupported:
                raise ValueError(f"rope_scaling.{unsupported[0]}: not supported by moeforge's YaRN")
            rope.setdefault("mscale", 0.0)
            rope.setdefault("mscale_all_dim", 0.0)
            if rope.get("factor") is None and "original_max_position_embeddings" in rope:
                rope["factor"] = hf["max_position_embeddings"] / rope["original_max_position_embeddings"]
            values["rope_scaling"] = {"type": kind, **rope}
        # HF initializer_range (0.02) is an inference-time artefact; keep the V3 training default.
        values.pop("initializer_range", None)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)
