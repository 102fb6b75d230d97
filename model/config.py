"""ModelConfig: every field of the published DeepSeek-V3 configuration, plus moeforge's training knobs.

Field names follow the Hugging Face `config.json` of deepseek-ai/DeepSeek-V3 so a checkpoint's config
maps onto this dataclass one to one (`ModelConfig.from_hf_dict`). Validation runs in `__post_init__`
and every error names the offending field, so a bad YAML fails before any work starts.

This module also holds `build_config`, the one builder that turns plain values (YAML, Hydra) into any
config dataclass of moeforge, model or platform, checking keys and types first.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field."""


@dataclass
class RopeScaling:
    """YaRN context extension (DeepSeek-V3 trains at 4K, extends to 128K).

    Its error messages name fields relative to itself (`factor ...`); `build_config` prefixes the
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
            raise ConfigError(f"type: only 'yarn' is supported, got {self.type!r}")
        if not self.factor >= 1.0:
            raise ConfigError(f"factor must be >= 1, got {self.factor}")
        if self.original_max_position_embeddings <= 0:
            raise ConfigError(
                "original_max_position_embeddings must be positive, "
                f"got {self.original_max_position_embeddings}"
            )
        if not self.beta_fast > self.beta_slow > 0:
            raise ConfigError(f"beta_fast ({self.beta_fast}) must exceed beta_slow ({self.beta_slow}) > 0")


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
            self.rope_scaling = build_config(RopeScaling, self.rope_scaling, "rope_scaling")
        self._validate()

    # ------------------------------------------------------------------------------------------------
    def _validate(self) -> None:
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"q_lora_rank must be a positive integer or null, got {self.q_lora_rank!r}")
        if self.num_nextn_predict_layers < 0:
            raise ConfigError(f"num_nextn_predict_layers must be >= 0, got {self.num_nextn_predict_layers}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even for rotary pairs, got {self.qk_rope_head_dim}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ConfigError(
                f"first_k_dense_replace must lie in [0, num_hidden_layers={self.num_hidden_layers}], "
                f"got {self.first_k_dense_replace}"
            )
        if self.moe_layer_freq <= 0:
            raise ConfigError(f"moe_layer_freq must be positive, got {self.moe_layer_freq}")
        if self.has_moe:
            self._validate_routing()
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ConfigError(f"scoring_func must be 'sigmoid' or 'softmax', got {self.scoring_func!r}")
        if self.topk_method not in ("noaux_tc", "group_limited_greedy", "greedy"):
            raise ConfigError(
                f"topk_method must be 'noaux_tc', 'group_limited_greedy' or 'greedy', got {self.topk_method!r}"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act: only 'silu' (SwiGLU) is supported, got {self.hidden_act!r}")
        for name in ("bias_update_speed", "seq_aux_loss_alpha", "mtp_loss_weight", "attention_dropout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.initializer_range > 0:
            raise ConfigError(f"initializer_range must be positive, got {self.initializer_range}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if self.tie_word_embeddings:
            raise ConfigError("tie_word_embeddings: must be false (DeepSeek-V3 unties embedding and head)")
        if self.seq_len <= 0:
            raise ConfigError(f"seq_len must be a positive integer, got {self.seq_len}")

    def _validate_routing(self) -> None:
        if self.n_routed_experts <= 0:
            raise ConfigError(
                f"n_routed_experts must be positive for MoE layers, got {self.n_routed_experts}"
            )
        if self.n_shared_experts < 0:
            raise ConfigError(f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if self.n_group <= 0:
            raise ConfigError(f"n_group must be positive, got {self.n_group}")
        if self.n_routed_experts % self.n_group:
            raise ConfigError(
                f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})"
            )
        if not 0 < self.topk_group <= self.n_group:
            raise ConfigError(f"topk_group must lie in [1, n_group={self.n_group}], got {self.topk_group}")
        experts_in_kept_groups = self.topk_group * (self.n_routed_experts // self.n_group)
        if not 0 < self.num_experts_per_tok <= experts_in_kept_groups:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must lie in [1, {experts_in_kept_groups}]: "
                f"the experts in topk_group={self.topk_group} kept groups of "
                f"{self.n_routed_experts // self.n_group}"
            )
        if self.topk_method == "noaux_tc" and self.n_routed_experts // self.n_group < 2:
            raise ConfigError(
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
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """Build from a plain mapping (Hydra / YAML) with `build_config`: an unknown key, a missing or
        mistyped value and a failed check all raise one ConfigError naming `model.<field>`."""
        return build_config(cls, values, "model")

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """Build from a Hugging Face DeepSeek-V3 `config.json`; HF-only bookkeeping keys are dropped.

        Reads both the published layout (`rope_scaling` + `rope_theta`) and transformers v5's
        `rope_parameters`. No rope entry, or rope_type "default", means plain RoPE (no YaRN); YaRN keys
        the file leaves out take Hugging Face's meaning (mscale absent = 0, factor absent =
        max_position_embeddings / original_max_position_embeddings)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in hf.items() if k in known}
        if "num_nextn_predict_layers" not in values and "num_mtp_layers" in hf:
            values["num_nextn_predict_layers"] = hf["num_mtp_layers"]
        if hf.get("rope_interleave") is False:
            raise ConfigError("rope_interleave: only DeepSeek's interleaved rotary layout is supported")
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
                raise ConfigError(f"rope_scaling.{unsupported[0]}: not supported by moeforge's YaRN")
            rope.setdefault("mscale", 0.0)
            rope.setdefault("mscale_all_dim", 0.0)
            if rope.get("factor") is None and "original_max_position_embeddings" in rope:
                rope["factor"] = hf["max_position_embeddings"] / rope["original_max_position_embeddings"]
            values["rope_scaling"] = {"type": kind, **rope}
        # HF initializer_range (0.02) is an inference-time artefact; keep the V3 training default.
        values.pop("initializer_range", None)
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------------------------------------
# The config builder
# ------------------------------------------------------------------------------------------------
def build_config(cls: type[T], values: Mapping[str, Any], where: str = "") -> T:
    """Build the config dataclass `cls` from plain values (YAML, or Hydra after OmegaConf.to_container).

    Before `cls(**values)` runs, every key must be a field of `cls`, every field without a default
    must be given, and every value must have its field's annotated type. Each failure raises one
    ConfigError naming the dotted key under `where` (`model.n_group: expected int, got 8.0`). The
    dataclass's own `__post_init__` checks name fields relative to the dataclass; their messages get
    the `where.` prefix here. `where=""` builds a root config (keys are named as they are).

    Type rules (strict, because a silently converted typo trains the wrong model):
    - int: an int, never a bool or a float (8.0 included: Hydra reads `n_group=8.0` as a float);
    - float: a float, or an int (converted to float); never a bool or a string;
    - str and bool: exactly that type;
    - `X | None` / Optional, unions: the first member that fits;  Literal: one of its values;
    - list[X], tuple[X, ...], tuple[X, Y]: a list or tuple (any sequence but a string), checked
      element by element (`key[i]`); tuples are built as tuples, since YAML has only lists;
    - dict[K, V]: a mapping, checked entry by entry (`key.name`);
    - a nested config dataclass: a mapping (built recursively, errors keep the full path) or an
      instance;  Any: anything.
    An annotation outside these rules is a programming error (TypeError), not a user error.
    """
    if not isinstance(values, Mapping):
        raise ConfigError(
            f"{where or cls.__name__}: expected a mapping of {cls.__name__} fields, got {values!r}"
        )
    # A field whose user-facing key is a Python keyword (`checkpoint.async`) is spelled otherwise in
    # the dataclass; the class maps the key in KEY_ALIASES ({"async": "async_save"}).
    aliases = getattr(cls, "KEY_ALIASES", {})
    values = {aliases.get(key, key): value for key, value in values.items()}
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted((key for key in values if key not in fields), key=str)
    if unknown:
        spelled = {field: key for key, field in aliases.items()}  # name fields as the user writes them
        known = ", ".join(sorted(spelled.get(name, name) for name in fields))
        raise ConfigError(f"{_join(where, unknown[0])}: unknown key (known: {known})")
    missing = [
        name
        for name, f in fields.items()
        if name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{_join(where, missing[0])}: missing (required)")
    hints = typing.get_type_hints(cls)
    kwargs = {key: _typed(value, hints[key], _join(where, key)) for key, value in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        msg = str(err)
        # A dataclass that already names itself in full (its own `where.` prefix) is left as it is.
        raise ConfigError(msg if not where or msg.startswith(f"{where}.") else f"{where}.{msg}") from None


class _WrongType(ConfigError):
    """`value` at `where` is not of type `hint`; a union tries its next member on this error only."""

    def __init__(self, where: str, hint: Any, value: Any) -> None:
        super().__init__(f"{where}: expected {_describe(hint)}, got {value!r}")
        self.where = where


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _typed(value: Any, hint: Any, where: str) -> Any:
    """`value` checked against `hint` (and converted: int -> float, list -> tuple, mapping -> dataclass)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return _typed(value, arg, where)
            except _WrongType as err:
                if err.where != where:  # the value fits this member's shape; an element inside is wrong
                    raise
        raise _WrongType(where, hint, value)
    if origin is Literal:
        if any(type(value) is type(arg) and value == arg for arg in args):
            return value
        raise _WrongType(where, hint, value)
    if hint is type(None) or hint is None:
        if value is None:
            return None
        raise _WrongType(where, hint, value)
    if hint in (bool, int, str):
        if type(value) is hint or (isinstance(value, hint) and not isinstance(value, bool)):
            return value
        raise _WrongType(where, hint, value)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _WrongType(where, hint, value)
    if hint in (list, tuple) or origin in (list, tuple):
        # Any sequence but a string: YAML gives lists, an OmegaConf ListConfig is a Sequence too.
        if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
            raise _WrongType(where, hint, value)
        if hint is tuple or origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                args = (args[0],) * len(value)
            elif not args:
                args = (Any,) * len(value)
            elif len(args) != len(value):
                raise _WrongType(where, hint, value)
            return tuple(
                _typed(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        item = args[0] if args else Any
        return [_typed(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is dict or origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _WrongType(where, hint, value)
        key_hint, value_hint = args or (Any, Any)
        return {
            _typed(k, key_hint, _join(where, k)): _typed(v, value_hint, _join(where, k))
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return build_config(hint, value, where)
        raise _WrongType(where, hint, value)
    raise TypeError(f"{where}: build_config has no rule for the annotation {hint!r}")


def _describe(hint: Any) -> str:
    """The type as the error messages name it: int, float, list[int], int | None, one of 'a', 'b'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " | ".join(_describe(arg) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if hint is type(None) or hint is None:
        return "None"
    if isinstance(hint, type) and not args:
        return hint.__name__
    return str(hint).replace("typing.", "")
