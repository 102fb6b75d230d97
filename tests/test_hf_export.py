"""Hugging Face export (platform/checkpoint/export.py, moeforge-convert): an fp32 export that
transformers and moeforge read back exactly, MTP included; the published FP8 layout, its exact
dequantisation and its error; and the CLI, bad inputs and good runs from a training checkpoint."""

from __future__ import annotations

import importlib.resources
import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from moeforge.model.config import ModelConfig
from moeforge.model.hf import dequantize_fp8_blockwise, hf_state_tensors, load_hf_checkpoint
from moeforge.model.transformer import build_model
from moeforge.platform.checkpoint import export
from moeforge.platform.checkpoint.export import (
    export_hf,
    is_fp8_weight,
    quantize_fp8_block,
)
from moeforge.platform.checkpoint.reshard import ModelState
from moeforge.platform.checkpoint.store import CheckpointError, save_checkpoint, save_shard
from moeforge.platform.config.builder import build_config
from safetensors import safe_open

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import accelerate  # noqa: F401  transformers' FP8 loader needs it (a dev dependency, like transformers)

pytestmark = pytest.mark.usefixtures("one_thread")

E4M3_REL = 2.0**-4  # half an ulp of a 3-bit mantissa: the relative rounding error of a normal e4m3
E4M3_SUBNORMAL_ABS = 2.0**-10  # half the e4m3 subnormal spacing (2^-9), in units of the block scale


def tiny_cfg(**changes) -> ModelConfig:
    """conf/model/tiny.yaml (4 layers: 1 dense, 3 MoE; MTP depth 1), with changes."""
    values = yaml.safe_load(
        importlib.resources.files("moeforge.conf").joinpath("model/tiny.yaml").read_text()
    )
    values.pop("arch")
    return build_config(ModelConfig, {**values, **changes}, "model")


def perturbed(model, seed: int, scale: float = 0.05):
    """Random weights large enough for O(1) logits (the init's 0.006 gives ~0.3), and non-zero router
    biases, so a wrong key, transpose or bias shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if p.dim() == 1 else scale * noise)
        for moe in model.moe_layers():
            bias = moe.gate.e_score_correction_bias
            bias.copy_(0.1 * torch.randn(bias.shape, generator=g))
    return model.eval()


def read_tensors(path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            tensors.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118
    return tensors


def ids_for(cfg: ModelConfig, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(0))


# --- (a) fp32 ------------------------------------------------------------------------------------------------
def test_fp32_export_matches_transformers_and_reads_back_bit_identical(tmp_path):
    from transformers import DeepseekV3ForCausalLM

    cfg = tiny_cfg()
    assert cfg.num_nextn_predict_layers == 1
    model = perturbed(build_model(cfg, seed=0), seed=0)
    out = export_hf(model, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # the .partial directory was renamed
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and "quantization_config" not in config

    ids = ids_for(cfg)
    hf_model = DeepseekV3ForCausalLM.from_pretrained(out).eval()  # it ignores the MTP layer (index 4)
    with torch.no_grad():
        expected, got = model(ids).logits, hf_model(ids).logits
    assert expected.abs().max() > 1.0  # not a comparison of near-zero tensors
    assert (expected - got).abs().max() <= 1e-4  # measured 2.3e-6 to 2.6e-6 (seeds 0-2), logits of max ~2.6

    tensors = read_tensors(tmp_path / "hf")
    mtp = f"model.layers.{cfg.num_hidden_layers}."
    for key in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                "mlp.experts.7.down_proj.weight", "self_attn.kv_b_proj.weight"):  # fmt: skip
        assert mtp + key in tensors, key
    # the MTP layer carries copies of the shared embedding and head, as the published checkpoint does
    assert torch.equal(tensors[mtp + "embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    assert torch.equal(tensors[mtp + "shared_head.head.weight"], tensors["lm_head.weight"])

    back = load_hf_checkpoint(out)
    assert back.cfg == cfg and len(back.mtp) == 1
    theirs = back.state_dict()
    for name, t in model.state_dict().items():
        assert t.dtype == theirs[name].dtype and torch.equal(t, theirs[name]), name


# --- (b) fp8 -------------------------------------------------------------------------------------------------
def reference_quant(w: torch.Tensor, block: int = 128):
    """Independent of kernels/: per block (ragged at the edges), scale = max(amax, 1e-4) / 448 and
    q = e4m3(w / scale). Returns (q, scale_inv, dequantized, per-element scale)."""
    rows, cols = w.shape
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale_inv = torch.empty(math.ceil(rows / block), math.ceil(cols / block))
    per_elem = torch.empty(rows, cols)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            r, c = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            tile = w[r, c].float()
            scale = tile.abs().max().clamp_min(1e-4) / 448.0
            q[r, c] = (tile / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            scale_inv[i, j] = per_elem[r, c] = scale
    return q, scale_inv, q.float() * per_elem, per_elem


def expected_fp8_keys(cfg: ModelConfig) -> set[str]:
    """The keys DeepSeek-V3's published checkpoint stores in FP8, for this config."""
    keys = set()
    for layer in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers):
        p = f"model.layers.{layer}."
        keys |= {
            f"{p}self_attn.{n}.weight"
            for n in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
        }
        mlps = [f"{p}mlp."]
        if cfg.is_moe_layer(layer) or layer >= cfg.num_hidden_layers:
            mlps = [f"{p}mlp.shared_experts."] + [f"{p}mlp.experts.{e}." for e in range(cfg.n_routed_experts)]
        keys |= {f"{m}{n}.weight" for m in mlps for n in ("gate_proj", "up_proj", "down_proj")}
    return keys


def test_fp8_export_has_the_published_dtypes_and_shapes(tmp_path):
    cfg = tiny_cfg()
    out = export_hf(build_model(cfg, seed=1), tmp_path / "fp8", fp8=True, dtype=torch.bfloat16)
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
    }  # fmt: skip
    assert config["torch_dtype"] == "bfloat16"
    tensors = read_tensors(tmp_path / "fp8")
    fp8 = {k for k, t in tensors.items() if t.dtype == torch.float8_e4m3fn}
    assert fp8 == expected_fp8_keys(cfg) == {k for k in tensors if is_fp8_weight(k)}
    for key in fp8:
        out_features, in_features = tensors[key].shape
        scale = tensors[key + "_scale_inv"]
        assert scale.dtype == torch.float32, key
        assert scale.shape == (math.ceil(out_features / 128), math.ceil(in_features / 128)), key
    # q_b_proj is [192, 64]: a full and a ragged row block, one ragged column block
    assert tensors["model.layers.0.self_attn.q_b_proj.weight_scale_inv"].shape == (2, 1)
    scales = {k for k in tensors if k.endswith("_scale_inv")}
    assert scales == {k + "_scale_inv" for k in fp8}
    for key, t in tensors.items():
        if key in fp8 or key in scales:
            continue
        # as published: everything else high precision, the MTP eh_proj included; the router fp32
        router = key.endswith(("mlp.gate.weight", "mlp.gate.e_score_correction_bias"))
        assert t.dtype == (torch.float32 if router else torch.bfloat16), key
    assert tensors["model.layers.4.eh_proj.weight"].dtype == torch.bfloat16
    assert load_hf_checkpoint(out).cfg == cfg


def test_fp8_read_back_is_dequant_of_quant_exactly(tmp_path):
    cfg = tiny_cfg()
    model = perturbed(build_model(cfg, seed=2), seed=2)
    export_hf(model, tmp_path / "fp8", fp8=True)
    tensors = read_tensors(tmp_path / "fp8")
    back = load_hf_checkpoint(tmp_path / "fp8")
    originals = hf_state_tensors(model)  # fp32, under the checkpoint keys
    ours = hf_state_tensors(back)
    checked = 0
    for key, w in originals.items():
        if not is_fp8_weight(key):
            assert torch.equal(ours[key], w), key  # kept in fp32: bit-identical
            continue
        q, scale_inv, deq, per_elem = reference_quant(w)
        assert torch.equal(tensors[key].view(torch.uint8), q.view(torch.uint8)), key
        assert torch.equal(tensors[key + "_scale_inv"], scale_inv), key
        assert torch.equal(ours[key], deq), key
        # within e4m3's rounding: relative for normals, half a subnormal step for the smallest values
        assert ((deq - w).abs() <= E4M3_REL * w.abs() + E4M3_SUBNORMAL_ABS * per_elem).all(), key
        checked += 1
    assert checked == len(expected_fp8_keys(cfg))


def test_quantize_fp8_block_ragged_and_zero_blocks():
    w = torch.randn(200, 300)
    w[128:, 256:] = 0  # an all-zero ragged corner block: zeros, never NaN
    q, scale_inv = quantize_fp8_block(w)
    ref_q, ref_scale, deq, _ = reference_quant(w)
    assert q.shape == (200, 300) and scale_inv.shape == (2, 3)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(scale_inv, ref_scale)
    assert torch.equal(dequantize_fp8_blockwise(q, scale_inv), deq)
    assert (deq[128:, 256:] == 0).all() and deq.isfinite().all()


def test_fp8_logits_close_to_the_original(tmp_path):
    """The model as training starts it (init std 0.006) against its fp8 read-back.

    Tolerance, measured: e4m3 keeps 3 mantissa bits, so each quantised matrix is off by ~2-3% RMS;
    the residual stream carries the exact embedding, so the logits move less. Over seeds 0-4 the
    relative (Frobenius) logit error was 1.2-1.5% (max |diff| 0.010-0.013 on logits of max ~0.33),
    and LM / MTP losses moved by <= 1.8e-4 (of ~8.3). Bounds: 2x the worst relative error, and 1e-3 on
    the losses. A broken export (wrong scale, transposed blocks) gives errors of order 100%. Candidly:
    with random weights 8x larger (std 0.05, chaotic attention, flipped expert choices) the relative
    error grows to ~30%; that model is not one training produces, so it is not the yardstick here."""
    cfg = tiny_cfg()
    model = build_model(cfg, seed=0).eval()
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    back = load_hf_checkpoint(export_hf(model, tmp_path / "fp8", fp8=True)).eval()
    ids = ids_for(cfg, seq=64)
    with torch.no_grad():
        a, b = model(ids, labels=ids), back(ids, labels=ids)
    rel = ((a.logits - b.logits).norm() / a.logits.norm()).item()
    assert 1e-4 < rel <= 0.03, rel  # and not zero: the weights really were quantised
    assert abs(a.lm_loss - b.lm_loss) <= 1e-3 and abs(a.mtp_loss - b.mtp_loss) <= 1e-3


def test_transformers_reads_the_fp8_export(tmp_path):
    """transformers' FP8 loader on CPU needs `accelerate` (a dev dependency, imported at the top) and,
    with no GPU, dequantises on load (`dequantize=True`). Measured with accelerate 1.15 and
    transformers 5.24: weights equal to moeforge's read-back, logits within 2.6e-6 (seeds 3-5).

    Its CPU dequantiser derives the block size from the scale grid (rows // scale_rows), so it
    mis-scales or refuses ragged 128-blocks, which the format allows and DeepSeek publishes
    (kv_a_proj_with_mqa [576, 7168] has 5 row blocks): a [192, 64] q_b_proj is read with 96-row
    blocks. moeforge reads ragged blocks exactly (the test above); this comparison uses a config whose
    FP8 weights are whole blocks or a single block each."""
    from transformers import DeepseekV3ForCausalLM

    cfg = tiny_cfg(num_attention_heads=2, num_key_value_heads=2, qk_nope_head_dim=48, v_head_dim=16)
    model = perturbed(build_model(cfg, seed=3), seed=3)
    out = export_hf(model, tmp_path / "fp8", fp8=True)
    ours = load_hf_checkpoint(out).eval()
    hf_model = DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    theirs = hf_model.state_dict()
    mtp = f"model.layers.{cfg.num_hidden_layers}."  # transformers has no MTP layer
    compared = 0
    for key, t in hf_state_tensors(ours).items():
        if is_fp8_weight(key) and ".experts." not in key and not key.startswith(mtp):  # experts: fused
            assert torch.equal(theirs[key], t), key
            compared += 1
    assert compared == 4 * 5 + 3 + 3 * 3  # attention of every layer, the dense MLP, 3 shared experts
    gate_up = theirs["model.layers.1.mlp.experts.gate_up_proj"]  # [experts, 2 * moe_inter, hidden]
    experts = ours.layers[1].mlp.experts
    assert torch.equal(gate_up, torch.cat([experts.gate_proj, experts.up_proj], dim=1))
    assert torch.equal(theirs["model.layers.1.mlp.experts.down_proj"], experts.down_proj)
    ids = ids_for(cfg)
    with torch.no_grad():
        assert (hf_model(ids).logits - ours(ids).logits).abs().max() <= 1e-4


# --- (c) moeforge-convert ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model and a complete moeforge checkpoint of it, as the training loops write one."""
    cfg = tiny_cfg()
    model = build_model(cfg, seed=4)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.01)
    run_dir = tmp_path_factory.mktemp("run")
    path = save_checkpoint(
        str(run_dir), 7, {"model": ModelState(model)}, samples_consumed=0, extra={"model": cfg.to_dict()}
    )
    return model, str(run_dir), path


def convert(capsys, *args: str) -> tuple[int, str, str]:
    from moeforge.jobs.convert import main

    rc = main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_bad_inputs_fail_in_one_line_naming_the_key(tmp_path, capsys, trained):
    path = trained[2]
    incomplete = tmp_path / "crashed"
    save_shard(str(incomplete), 3, {"model": {"w": torch.zeros(2)}})  # a shard, never committed
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    out = f"out={tmp_path / 'o'}"
    cases = [
        ([out], "checkpoint: required"),
        ([f"checkpoint={tmp_path / 'nope'}", out], f"checkpoint: {tmp_path / 'nope'}: no such directory"),
        ([f"checkpoint={incomplete}", out], "checkpoint: "),
        ([f"checkpoint={incomplete}/checkpoints/step_00000003", out], "not a complete checkpoint"),
        ([f"checkpoint={path}", f"out={tmp_path / 'full'}"], "out: "),
        ([f"checkpoint={path}"], "out: required"),
        ([f"checkpoint={path}", out, "dtype=int8"], "dtype: must be one of float32, bfloat16, float16"),
        ([f"checkpoint={path}", out, "fp8=maybe"], "fp8: must be true or false"),
        ([f"checkpoint={path}", out, "max_shard_gb=0"], "max_shard_gb: must be a number > 0"),
        ([f"checkpoint={path}", out, "shards=2"], "shards: unknown key"),
        ([f"checkpoint={path}", out, "fp8"], "'fp8': expected key=value"),
        (
            [f"checkpoint={path}", f"out={tmp_path / 'full' / 'x' / 'hf'}"],
            f"out: {tmp_path / 'full' / 'x' / 'hf'} cannot be created: {tmp_path / 'full' / 'x'} is a file",
        ),
    ]
    for args, message in cases:
        rc, stdout, err = convert(capsys, *args)
        assert rc == 2, args
        assert err.startswith("moeforge-convert: error: ") and err.count("\n") == 1, err
        assert message in err, (message, err)
        assert "Traceback" not in err and stdout == ""
    assert "exists and is not empty" in convert(capsys, f"checkpoint={path}", f"out={tmp_path / 'full'}")[2]
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_a_corrupt_shard_is_refused_by_convert_and_by_generation_loading(tmp_path, capsys, trained):
    """Every reader checks a shard against its manifest's sha256, as resume does."""
    import shutil

    from moeforge.platform.checkpoint.reshard import load_model_from_checkpoint

    copy = tmp_path / "step_00000007"
    shutil.copytree(trained[2], copy)
    (shard,) = copy.glob("*.safetensors")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # one bit of the last tensor: same size, different content
    shard.write_bytes(data)
    rc, stdout, err = convert(capsys, f"checkpoint={copy}", f"out={tmp_path / 'hf'}")
    assert rc == 2 and stdout == "", err
    assert err.startswith(f"moeforge-convert: error: {shard}: sha256 ") and err.endswith("(corrupt)\n"), err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.partial").exists()
    with pytest.raises(CheckpointError, match=rf"{shard}: sha256 .* \(corrupt\)"):
        load_model_from_checkpoint(str(copy))


def test_cli_exports_a_checkpoint_fp32_from_the_run_directory(tmp_path, capsys, trained):
    model, run_dir, _ = trained
    rc, stdout, err = convert(
        capsys, f"checkpoint={run_dir}", f"out={tmp_path / 'hf'}"
    )  # its newest checkpoint
    assert rc == 0, err
    assert "fp8: no" in stdout and str(tmp_path / "hf") in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    back = load_hf_checkpoint(tmp_path / "hf")
    theirs = back.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(t, theirs[name]), name


def test_cli_exports_a_checkpoint_fp8_sharded(tmp_path, capsys, trained):
    model, _, path = trained
    out = tmp_path / "fp8"
    rc, stdout, err = convert(
        capsys, f"checkpoint={path}", f"out={out}", "fp8=true", "dtype=bfloat16", "max_shard_gb=0.002"
    )
    assert rc == 0, err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((out / f).exists() for f in files)
    written = read_tensors(out)
    fp8_count = len(expected_fp8_keys(model.cfg))
    assert f"wrote {len(written)} tensors" in stdout and f"fp8: {fp8_count} e4m3 weights" in stdout
    # the same bytes as exporting the model directly
    direct = read_tensors(Path(export_hf(model, tmp_path / "direct", fp8=True, dtype=torch.bfloat16)))
    assert written.keys() == direct.keys()
    for key, t in direct.items():
        assert t.dtype == written[key].dtype and torch.equal(
            t.view(torch.uint8), written[key].view(torch.uint8)
        ), key
    assert load_hf_checkpoint(out).cfg == model.cfg


def test_interrupted_export_leaves_no_directory(tmp_path, monkeypatch):
    def fail_midway(tensors, config, path, max_shard_bytes=None):
        (path / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_hf_directory", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        export_hf(build_model(tiny_cfg(), seed=5), tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []
