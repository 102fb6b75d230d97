"""Hugging Face interop: logits parity with transformers' DeepseekV3ForCausalLM, round trips, FP8
block-scaled checkpoints, and malformed checkpoints that must fail naming the key."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from moeforge.model.config import ModelConfig
from moeforge.model.hf import (
    CheckpointError,
    dequantize_fp8_blockwise,
    load_hf_checkpoint,
    save_hf_checkpoint,
)
from moeforge.model.transformer import build_model
from safetensors import safe_open
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # the reference (a dev dependency)

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "n_routed_experts": 8,
    "n_group": 4,
    "topk_group": 2,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 24,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 12,
    "max_position_embeddings": 64,
}
YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "rope_theta": 10000.0,
    "mscale": 0.9,
    "mscale_all_dim": 0.8,
    "beta_fast": 32,
    "beta_slow": 1,
}


OUR_YARN = {"type": "yarn", **{k: v for k, v in YARN.items() if k not in ("rope_type", "rope_theta")}}


def random_hf_model(config: DeepseekV3Config, seed: int) -> DeepseekV3ForCausalLM:
    """An HF model with random non-zero weights everywhere, including the router bias."""
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.1)
    return model


def assert_logits_match(hf_model, ours, vocab: int, seq: int = 20) -> None:
    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = ours.eval()(ids).logits
    diff = (expected - got).abs().max().item()
    assert diff <= 1e-4, diff
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero tensors


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"n_group": 2, "topk_group": 1, "routed_scaling_factor": 1.0, "rope_parameters": YARN},
        {"q_lora_rank": None, "first_k_dense_replace": 0, "n_group": 1, "topk_group": 1},
        {
            "first_k_dense_replace": 2,
            "n_shared_experts": 2,
            "norm_topk_prob": False,
            "num_experts_per_tok": 3,
        },
        {
            "attention_bias": True,
            "rope_parameters": {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0, "factor": 8.0},
        },
    ],
    ids=["base", "groups-yarn", "full-rank-q", "dense2-shared2", "bias-yarn8"],
)
def test_logits_match_transformers(tmp_path, changes):
    hf_model = random_hf_model(DeepseekV3Config(**{**BASE, **changes}), seed=1)
    hf_model.save_pretrained(tmp_path)
    ours = load_hf_checkpoint(tmp_path)
    assert len(ours.mtp) == 0  # transformers writes no MTP weights: loaded without MTP
    assert_logits_match(hf_model, ours, BASE["vocab_size"])


def test_logits_match_on_transformers_default_config_scaled_down(tmp_path):
    """A config we did not write: transformers' DeepSeek-V3 defaults with every size divided down."""
    values = DeepseekV3Config().to_dict()
    divisors = {
        "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 128, "moe_intermediate_size": 128,
        "num_attention_heads": 32, "num_key_value_heads": 32, "q_lora_rank": 64, "kv_lora_rank": 32,
        "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "n_routed_experts": 16,
        "num_hidden_layers": 15, "max_position_embeddings": 32,
    }  # fmt: skip
    for key, div in divisors.items():
        values[key] = values[key] // div
    for derived in ("head_dim", "qk_head_dim"):  # recomputed by the config from the sizes above
        values.pop(derived, None)
    config = DeepseekV3Config.from_dict(values)
    assert (config.n_group, config.topk_group, config.num_experts_per_tok) == (8, 4, 8)  # untouched defaults
    hf_model = random_hf_model(config, seed=2)
    hf_model.save_pretrained(tmp_path)
    ours = load_hf_checkpoint(tmp_path)
    assert ours.cfg.first_k_dense_replace == 3 and len(ours.moe_layers()) == config.num_hidden_layers - 3
    assert_logits_match(hf_model, ours, config.vocab_size)


def tiny_cfg(**over) -> ModelConfig:
    values = {**BASE, "num_nextn_predict_layers": 1, "rope_scaling": None, "seq_len": 16}
    values.update(over)
    return ModelConfig(**values)


def test_save_then_transformers_loads_the_same_model(tmp_path):
    ours = build_model(tiny_cfg(num_nextn_predict_layers=0, rope_scaling=OUR_YARN), seed=3)
    with torch.no_grad():
        for moe in ours.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.01)
    save_hf_checkpoint(ours, tmp_path)
    hf_model = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert torch.allclose(hf_model(ids).logits, ours.eval()(ids).logits, atol=1e-5)


def test_round_trip_with_mtp_and_shards_keeps_every_tensor(tmp_path):
    ours = build_model(tiny_cfg(num_nextn_predict_layers=2), seed=4)
    save_hf_checkpoint(ours, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    for key in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                "shared_head.head.weight", "embed_tokens.weight", "mlp.experts.7.down_proj.weight",
                "mlp.gate.e_score_correction_bias", "self_attn.kv_a_proj_with_mqa.weight"):  # fmt: skip
        assert f"model.layers.4.{key}" in index["weight_map"], key  # second MTP depth: 3 + 1
    back = load_hf_checkpoint(tmp_path)
    assert back.cfg == ours.cfg
    theirs = back.state_dict()
    for name, t in ours.state_dict().items():
        assert torch.equal(t, theirs[name]), name
    assert len(load_hf_checkpoint(tmp_path, with_mtp=False).mtp) == 0


# --- FP8 -----------------------------------------------------------------------------------------------------
def quantize_reference(w: torch.Tensor, block: int = 128):
    """Per 128x128 block: scale = amax / 448, e4m3 = w / scale; returns (fp8, scale_inv, dequantized)."""
    rows, cols = w.shape
    nr, nc = math.ceil(rows / block), math.ceil(cols / block)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale_inv = torch.empty(nr, nc)
    deq = torch.empty(rows, cols)
    for i in range(nr):
        for j in range(nc):
            tile = w[i * block : (i + 1) * block, j * block : (j + 1) * block].float()
            scale = tile.abs().max().clamp_min(1e-12) / 448.0
            qt = (tile / scale).to(torch.float8_e4m3fn)
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = qt
            scale_inv[i, j] = scale
            deq[i * block : (i + 1) * block, j * block : (j + 1) * block] = qt.float() * scale
    return q, scale_inv, deq


def test_dequantize_handles_ragged_blocks():
    w = torch.randn(200, 300)
    q, s, deq = quantize_reference(w)
    assert s.shape == (2, 3)
    assert torch.equal(dequantize_fp8_blockwise(q, s), deq)
    assert (deq - w).abs().max() < 0.1 * w.abs().max()  # e4m3 keeps ~2 significant digits
    with pytest.raises(ValueError, match="does not tile"):
        dequantize_fp8_blockwise(q, s[:, :2])


def test_fp8_block_scaled_checkpoint_loads_dequantized(tmp_path):
    cfg = tiny_cfg(hidden_size=160, q_lora_rank=136, intermediate_size=200, kv_lora_rank=144)
    save_hf_checkpoint(build_model(cfg, seed=5), tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    expected = {}
    for key in list(tensors):
        skip = ("mlp.gate.weight", "embed_tokens.weight", "shared_head.head.weight")  # kept in high precision
        if ".layers." in key and tensors[key].dim() == 2 and not key.endswith(skip):
            q, s, deq = quantize_reference(tensors[key])
            tensors[key], tensors[key.removesuffix("weight") + "weight_scale_inv"] = q, s
            expected[key] = deq
    assert "model.layers.0.mlp.gate_proj.weight" in expected and len(expected) > 20
    save_file(tensors, tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(config))

    model = load_hf_checkpoint(tmp_path)
    attn = model.layers[0].self_attn
    assert torch.equal(attn.q_b_proj.weight, expected["model.layers.0.self_attn.q_b_proj.weight"])
    assert torch.equal(
        attn.kv_a_proj_with_mqa.weight, expected["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    )
    assert torch.equal(
        model.layers[1].mlp.experts.up_proj[5], expected["model.layers.1.mlp.experts.5.up_proj.weight"]
    )
    assert torch.equal(model.mtp[0].eh_proj.weight, expected["model.layers.3.eh_proj.weight"])
    assert model(torch.randint(0, 64, (1, 8))).logits.isfinite().all()


# --- malformed checkpoints ---------------------------------------------------------------------------------------
def _rewrite(path, edit):
    with safe_open(path / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


@pytest.fixture
def saved(tmp_path):
    save_hf_checkpoint(build_model(tiny_cfg(), seed=6), tmp_path)
    return tmp_path


def test_missing_tensor_is_named(saved):
    _rewrite(saved, lambda t: t.pop("model.layers.2.mlp.experts.3.gate_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.3\.gate_proj\.weight"):
        load_hf_checkpoint(saved)


def test_wrong_shape_is_named(saved):
    _rewrite(saved, lambda t: t.update({"model.layers.0.self_attn.kv_b_proj.weight": torch.zeros(5, 16)}))
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.0\.self_attn\.kv_b_proj\.weight: shape \(5, 16\)"
    ):
        load_hf_checkpoint(saved)


def test_unexpected_tensor_is_named(saved):
    _rewrite(saved, lambda t: t.update({"model.layers.1.mlp.mystery.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.1\.mlp\.mystery\.weight'"):
        load_hf_checkpoint(saved)


def test_fp8_weight_without_scale_is_named(saved):
    key = "model.layers.0.self_attn.o_proj.weight"
    _rewrite(saved, lambda t: t.update({key: t[key].to(torch.float8_e4m3fn)}))
    with pytest.raises(CheckpointError, match=r"o_proj\.weight: FP8 tensor without .*weight_scale_inv"):
        load_hf_checkpoint(saved)


def test_missing_shard_and_config_are_named(tmp_path):
    save_hf_checkpoint(build_model(tiny_cfg(), seed=7), tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / shard).unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard} is missing"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: not found"):
        load_hf_checkpoint(tmp_path)
