"""ModelConfig: bad values fail naming the field; Hugging Face config.json variants map correctly."""

from __future__ import annotations

import math

import pytest
from moeforge.model.config import ConfigError, ModelConfig

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
        ModelConfig.from_dict({**SMALL, **changes})
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
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf_dict({**SMALL, **hf})
