"""ModelConfig: bad values and types fail naming the field; Hugging Face config.json variants map
correctly; build_config checks every annotation kind."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
from moeforge.model.config import ModelConfig, RopeScaling
from moeforge.platform.config.builder import ConfigError, build_config

SMALL = {
    "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
    "num_hidden_layers": 2, "num_attention_heads": 2, "q_lora_rank": 24, "kv_lora_rank": 16,
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "n_routed_experts": 8, "n_group": 4,
    "topk_group": 2, "num_experts_per_tok": 2, "first_k_dense_replace": 1, "rope_scaling": None,
}  # fmt: skip


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"topk_group": 5}, "topk_group"),
        ({"n_routed_experts": 10}, "n_routed_experts"),
        ({"num_experts_per_tok": 5}, "num_experts_per_tok"),  # only 2 groups x 2 experts are kept
        ({"hidden_size": 0}, "hidden_size"),
        ({"kv_lora_rank": -4}, "kv_lora_rank"),
        ({"q_lora_rank": 0}, "q_lora_rank"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
        ({"scoring_func": "relu"}, "scoring_func"),
        ({"topk_method": "random"}, "topk_method"),
        ({"first_k_dense_replace": 3}, "first_k_dense_replace"),
        ({"n_group": 8, "topk_group": 2}, "n_group"),  # noaux_tc needs >= 2 experts per group
        ({"rope_scaling": {"type": "yarn", "factor": 0.5}}, "rope_scaling.factor"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"hidden_sise": 32}, "hidden_sise"),  # unknown key
    ],
)
def test_invalid_config_fails_naming_the_field(changes, field):
    with pytest.raises(ConfigError) as info:
        build_config(ModelConfig, {**SMALL, **changes}, "model")
    assert field in str(info.value)
    assert "\n" not in str(info.value)


def test_published_config_json_maps_onto_the_defaults():
    published = {  # the fields of deepseek-ai/DeepSeek-V3's config.json that differ in form from ours
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "num_nextn_predict_layers": 1,
        "rope_theta": 10000, "max_position_embeddings": 163840, "initializer_range": 0.02,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
    }  # fmt: skip
    cfg = ModelConfig.from_hf_dict(published)
    assert cfg == ModelConfig()
    mscale = 0.1 * math.log(40) + 1
    assert math.isclose(cfg.softmax_scale, 192**-0.5 * mscale**2)


def test_transformers_v5_rope_parameters():
    plain = ModelConfig.from_hf_dict(
        {**SMALL, "rope_parameters": {"rope_type": "default", "rope_theta": 5e4}}
    )
    assert plain.rope_scaling is None and plain.rope_theta == 5e4
    assert ModelConfig.from_hf_dict({**SMALL, "rope_scaling": None}).rope_scaling is None
    yarn = ModelConfig.from_hf_dict(
        {**SMALL, "max_position_embeddings": 64,
         "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "original_max_position_embeddings": 16}}
    )  # fmt: skip
    # keys left out take transformers' meaning: factor from the lengths, no mscale
    assert yarn.rope_scaling.factor == 4.0 and yarn.rope_scaling.mscale_all_dim == 0.0
    assert yarn.softmax_scale == yarn.qk_head_dim**-0.5


@pytest.mark.parametrize(
    "hf,field",
    [
        ({"rope_interleave": False}, "rope_interleave"),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "attention_factor": 1.3}},
            "attention_factor",
        ),
        ({"topk_group": 9}, "topk_group"),
    ],
)
def test_unsupported_hf_config_fails_naming_the_key(hf, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_hf_dict({**SMALL, **hf})


# --------------------------------------------------------------------------------------------------
# Types: build_config, the one builder of every config dataclass
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes, message",
    [
        ({"n_group": 8.0}, "model.n_group: expected int, got 8.0"),  # never truncated to 8
        ({"n_group": True}, "model.n_group: expected int, got True"),
        ({"routed_scaling_factor": "abc"}, "model.routed_scaling_factor: expected float, got 'abc'"),
        ({"routed_scaling_factor": False}, "model.routed_scaling_factor: expected float, got False"),
        ({"norm_topk_prob": 1}, "model.norm_topk_prob: expected bool, got 1"),
        ({"scoring_func": 1}, "model.scoring_func: expected str, got 1"),
        ({"q_lora_rank": "24"}, "model.q_lora_rank: expected int | None, got '24'"),
        ({"rope_scaling": {"factor": "forty"}}, "model.rope_scaling.factor: expected float, got 'forty'"),
        ({"rope_scaling": {"factor": 0.5}}, "model.rope_scaling.factor must be >= 1, got 0.5"),
        ({"rope_scaling": {"extra": 1}}, "model.rope_scaling.extra: unknown key (known: beta_fast, "),
        ({"rope_scaling": [40.0]}, "model.rope_scaling: expected RopeScaling | None, got [40.0]"),
        ({"hidden_sise": 32}, "model.hidden_sise: unknown key (known: attention_bias, "),
    ],
)
def test_a_wrong_type_fails_naming_the_dotted_key(changes, message):
    with pytest.raises(ConfigError) as info:
        build_config(ModelConfig, {**SMALL, **changes}, "model")
    assert str(info.value).startswith(message), str(info.value)


def test_a_float_field_takes_an_int_as_a_float():
    cfg = build_config(ModelConfig, {**SMALL, "routed_scaling_factor": 2, "rope_scaling": {"factor": 4}}, "model")
    assert type(cfg.routed_scaling_factor) is float and cfg.routed_scaling_factor == 2.0
    assert type(cfg.rope_scaling.factor) is float and cfg.rope_scaling.factor == 4.0


def test_the_defaults_round_trip_through_the_builder():
    assert build_config(ModelConfig, ModelConfig().to_dict(), "model") == ModelConfig()
    assert build_config(RopeScaling, dataclasses.asdict(RopeScaling()), "rope") == RopeScaling()


@dataclass
class _Leaf:
    size: int
    mode: Literal["a", "b"] = "a"


@dataclass
class _Every:
    """One field of each annotation kind build_config knows."""

    leaf: _Leaf
    ints: list[int] = field(default_factory=list)
    pair: tuple[float, float] = (0.0, 1.0)
    many: tuple[str, ...] = ()
    table: dict[str, int] = field(default_factory=dict)
    maybe: _Leaf | None = None
    anything: Any = None


@pytest.mark.parametrize(
    "values, message",
    [
        ({}, "cfg.leaf: missing (required)"),
        ({"leaf": {}}, "cfg.leaf.size: missing (required)"),
        ({"leaf": 3}, "cfg.leaf: expected _Leaf, got 3"),
        ({"leaf": {"size": 1, "mode": "c"}}, "cfg.leaf.mode: expected one of 'a', 'b', got 'c'"),
        ({"leaf": {"size": 1}, "ints": [1, 2.0]}, "cfg.ints[1]: expected int, got 2.0"),
        ({"leaf": {"size": 1}, "ints": 1}, "cfg.ints: expected list[int], got 1"),
        ({"leaf": {"size": 1}, "pair": [1.0]}, "cfg.pair: expected tuple[float, float], got [1.0]"),
        ({"leaf": {"size": 1}, "many": ["x", 2]}, "cfg.many[1]: expected str, got 2"),
        ({"leaf": {"size": 1}, "table": {"k": "v"}}, "cfg.table.k: expected int, got 'v'"),
        ({"leaf": {"size": 1}, "table": [1]}, "cfg.table: expected dict[str, int], got [1]"),
        ({"leaf": {"size": 1}, "maybe": {"size": 1.5}}, "cfg.maybe.size: expected int, got 1.5"),
        ({"leaf": {"size": 1}, "maybe": "x"}, "cfg.maybe: expected _Leaf | None, got 'x'"),
    ],
)
def test_every_annotation_kind_is_checked(values, message):
    with pytest.raises(ConfigError) as info:
        build_config(_Every, values, "cfg")
    assert str(info.value) == message


def test_the_builder_converts_yaml_shapes():
    cfg = build_config(_Every, {"leaf": {"size": 1}, "pair": [1, 2], "many": ["x"], "maybe": {"size": 2}})
    assert cfg.pair == (1.0, 2.0) and type(cfg.pair[0]) is float and cfg.many == ("x",)
    assert cfg.maybe == _Leaf(2) and cfg.leaf == _Leaf(1)
    with pytest.raises(ConfigError, match=r"^cfg: expected a mapping of _Every fields, got \[\]$"):
        build_config(_Every, [], "cfg")


def test_an_annotation_without_a_rule_is_a_programming_error():
    @dataclass
    class Odd:
        fn: complex = 0j

    with pytest.raises(TypeError, match="no rule for the annotation"):
        build_config(Odd, {"fn": 1j}, "odd")
