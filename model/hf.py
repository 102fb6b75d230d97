"""Hugging Face DeepSeek-V3 checkpoints <-> moeforge `Transformer`, through safetensors only.

Layout read and written: `config.json` plus `model.safetensors` or shards with
`model.safetensors.index.json`; per-expert keys (`model.layers.N.mlp.experts.E.gate_proj.weight`),
which we stack into `RoutedExperts`; MTP modules at layer indices >= num_hidden_layers
(`model.layers.61.enorm/hnorm/eh_proj/shared_head.norm` plus the usual block keys; the copies of the
shared embedding and head stored there are written on save and ignored on load). FP8 e4m3 weights
with a `weight_scale_inv` of 128x128 block scales (the published checkpoint) are dequantised on load.

Writing is two steps so a caller can transform tensors in between (platform/checkpoint/export.py
quantises to FP8 there): `hf_state_tensors(model)` gives {checkpoint key: tensor}, and
`write_hf_directory(tensors, config, path)` writes config.json and the safetensors files.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from moeforge.model.config import ModelConfig
from moeforge.model.transformer import Transformer
from safetensors import safe_open
from safetensors.torch import save_file

_EXPERT_PARAM = re.compile(r"mlp\.experts\.(gate_proj|up_proj|down_proj)$")
# The router stays fp32 (the published checkpoint has gate.weight in bf16, e_score_correction_bias fp32;
# we keep both fp32 since top-k routing decisions are sensitive to their rounding).
_FP32_KEYS = ("gate.weight", "gate.e_score_correction_bias")
# moeforge-only training knobs, written into config.json so they survive a round trip
_TRAINING_KEYS = ("bias_update_speed", "seq_aux_loss_alpha", "mtp_loss_weight", "seq_len", "moe_layer_freq")


class CheckpointError(ValueError):
    """A checkpoint is malformed; the message names the file or tensor key."""


# --- FP8 block dequantisation -------------------------------------------------------------------------------
def dequantize_fp8_blockwise(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> torch.Tensor:
    """fp32 weight = fp8 weight [M, N] * scale_inv [ceil(M/bm), ceil(N/bn)] broadcast over its block
    (the last row/column blocks may be ragged)."""
    rows, cols = weight.shape
    bm, bn = block
    if tuple(scale_inv.shape) != (math.ceil(rows / bm), math.ceil(cols / bn)):
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not tile a {rows}x{cols} weight in {bm}x{bn} blocks"
        )
    scale = scale_inv.float().repeat_interleave(bm, dim=0)[:rows].repeat_interleave(bn, dim=1)[:, :cols]
    return weight.float() * scale


# --- key mapping ---------------------------------------------------------------------------------------------
def hf_keys(name: str, cfg: ModelConfig) -> str | list[str]:
    """The checkpoint key of one moeforge state-dict entry; a list (one per expert) for stacked experts."""
    fixed = {
        "embed.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "head.weight": "lm_head.weight",
    }
    if name in fixed:
        return fixed[name]
    if m := re.fullmatch(r"layers\.(\d+)\.(.+)", name):
        prefix, rest = f"model.layers.{m[1]}.", m[2]
    elif m := re.fullmatch(r"mtp\.(\d+)\.(.+)", name):
        prefix, rest = f"model.layers.{cfg.num_hidden_layers + int(m[1])}.", m[2]
        rest = "shared_head.norm.weight" if rest == "norm.weight" else rest.removeprefix("block.")
    else:
        raise KeyError(f"no checkpoint key for model parameter {name!r}")
    if e := _EXPERT_PARAM.search(rest):
        return [f"{prefix}mlp.experts.{i}.{e[1]}.weight" for i in range(cfg.n_routed_experts)]
    return prefix + rest


def _mtp_layer_ids(cfg: ModelConfig, depth: int) -> list[int]:
    return [cfg.num_hidden_layers + d for d in range(depth)]


# --- reading -------------------------------------------------------------------------------------------------
class _Reader:
    """Tensor access across one or more safetensors files, dequantising FP8 weights on the way."""

    def __init__(self, path: Path, block: tuple[int, int]) -> None:
        self.block = block
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.where = {k: path / f for k, f in weight_map.items()}
            for f in set(self.where.values()):
                if not f.exists():
                    raise CheckpointError(f"{index}: shard {f.name} is missing")
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{path}: no *.safetensors files (and no model.safetensors.index.json)")
            self.where = {}
            for f in files:
                with safe_open(f, "pt") as h:
                    for k in h.keys():  # noqa: SIM118 (safe_open is not iterable)
                        if k in self.where:
                            raise CheckpointError(f"{k}: stored in both {self.where[k].name} and {f.name}")
                        self.where[k] = f
        self._open: dict[Path, object] = {}
        self.used: set[str] = set()

    def _raw(self, key: str) -> torch.Tensor:
        f = self.where[key]
        if f not in self._open:
            self._open[f] = safe_open(f, "pt")
        self.used.add(key)
        try:
            return self._open[f].get_tensor(key)
        except Exception as exc:  # index says the key is here but the file disagrees
            raise CheckpointError(f"{key}: cannot be read from {f.name}: {exc}") from exc

    def get(self, key: str, shape: torch.Size) -> torch.Tensor:
        if key not in self.where:
            raise CheckpointError(f"missing tensor {key!r} in the checkpoint")
        t = self._raw(key)
        scale_key = key.removesuffix("weight") + "weight_scale_inv"
        if key.endswith(".weight") and scale_key in self.where:
            t = dequantize_fp8_blockwise(t, self._raw(scale_key), self.block)
        elif t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise CheckpointError(f"{key}: FP8 tensor without {scale_key}")
        if t.shape != shape:
            raise CheckpointError(
                f"{key}: shape {tuple(t.shape)} in the checkpoint, the config needs {tuple(shape)}"
            )
        return t


def load_hf_checkpoint(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    with_mtp: bool | None = None,
) -> Transformer:
    """Build a Transformer from a Hugging Face DeepSeek-V3 checkpoint directory.

    with_mtp: None loads the MTP modules when the checkpoint has them (transformers' own
    `save_pretrained` writes none) and otherwise builds the model without MTP; True requires them;
    False drops them. Any missing tensor, wrong shape or unexpected key fails naming the key.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{config_file}: not found")
    hf_cfg = json.loads(config_file.read_text())
    cfg = ModelConfig.from_hf_dict(hf_cfg)
    block = tuple((hf_cfg.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
    reader = _Reader(path, block)

    mtp_prefixes = tuple(f"model.layers.{i}." for i in _mtp_layer_ids(cfg, cfg.num_nextn_predict_layers))
    has_mtp = any(k.startswith(mtp_prefixes) for k in reader.where) if mtp_prefixes else False
    if with_mtp is None:
        with_mtp = has_mtp
    if not with_mtp:
        cfg = cfg.replace(num_nextn_predict_layers=0)

    with torch.device("meta"):
        model = Transformer(cfg)
    state = {}
    for name, ref in model.state_dict().items():
        keys = hf_keys(name, cfg)
        if isinstance(keys, list):  # stacked routed experts
            tensor = torch.stack([reader.get(k, ref.shape[1:]) for k in keys])
        else:
            tensor = reader.get(keys, ref.shape)
        state[name] = tensor.to(torch.float32 if keeps_fp32(name) else dtype)
    model.load_state_dict(state, strict=True, assign=True)
    for moe in model.moe_layers():
        moe.reset_load()  # non-persistent buffer, still on meta after assign

    unexpected = sorted(
        k for k in set(reader.where) - reader.used if not _ignorable(k, cfg, with_mtp, hf_cfg)
    )
    if unexpected:
        raise CheckpointError(
            f"unexpected tensor {unexpected[0]!r} in the checkpoint ({len(unexpected)} in all)"
        )
    return model.to(device)


def _ignorable(key: str, cfg: ModelConfig, with_mtp: bool, hf_cfg: dict) -> bool:
    """Keys that carry nothing we load: FP8 scales (consumed with their weight), rotary caches, the MTP
    layers' copies of the shared embedding/head, and any MTP layer when MTP is dropped."""
    if key.endswith(("weight_scale_inv", "rotary_emb.inv_freq")):
        return True
    m = re.match(r"model\.layers\.(\d+)\.(.+)", key)
    if m and int(m[1]) >= cfg.num_hidden_layers:
        return not with_mtp or m[2] in ("embed_tokens.weight", "shared_head.head.weight")
    return False


# --- writing -------------------------------------------------------------------------------------------------
def hf_config_dict(cfg: ModelConfig) -> dict:
    """config.json content: the published DeepSeek-V3 layout, plus moeforge's training knobs."""
    values = cfg.to_dict()
    out = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "rope_interleave": True}
    out.update({k: v for k, v in values.items() if k != "rope_scaling"})
    out["rope_scaling"] = values["rope_scaling"]  # {"type": "yarn", ...} or None
    out["torch_dtype"] = "float32"
    return out


def keeps_fp32(name: str) -> bool:
    """True for the router's weight and bias (a moeforge or a checkpoint name): they stay fp32
    whatever dtype the rest is written or loaded in."""
    return name.endswith(_FP32_KEYS)


def hf_state_tensors(model: Transformer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors under the published checkpoint keys, each its own contiguous CPU tensor.

    Stacked routed experts are split per expert; MTP depth d is layer num_hidden_layers + d, with the
    copies of the shared embedding and head that the published checkpoint stores there. dtype casts
    every tensor but the router (`keeps_fp32`); None keeps the model's dtypes."""
    cfg = model.cfg
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if dtype is not None and not keeps_fp32(name):
            t = t.to(dtype)
        keys = hf_keys(name, cfg)
        for key, part in zip(keys, t) if isinstance(keys, list) else [(keys, t)]:
            tensors[key] = part
    for layer in _mtp_layer_ids(cfg, len(model.mtp)):
        tensors[f"model.layers.{layer}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
        tensors[f"model.layers.{layer}.shared_head.head.weight"] = tensors["lm_head.weight"]
    # safetensors refuses views into one storage (stacked experts, the MTP copies): give each its own
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}


def write_hf_directory(
    tensors: dict[str, torch.Tensor],
    config: dict,
    path: str | Path,
    max_shard_bytes: int | None = None,
) -> list[str]:
    """Write config.json and the tensors into `path` (created if needed): one model.safetensors, or,
    with max_shard_bytes, shards `model-0000i-of-0000n.safetensors` of at most that many bytes each
    (a single larger tensor gets a shard of its own) plus model.safetensors.index.json.

    Tensors are written in the order given. Returns the safetensors file names written."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if max_shard_bytes is None:
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        return ["model.safetensors"]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    weight_map = {}
    names = []
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
        names.append(fname)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def save_hf_checkpoint(
    model: Transformer,
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
) -> None:
    """Write `model` as a Hugging Face DeepSeek-V3 checkpoint directory (per-expert keys, MTP layers at
    index >= num_hidden_layers). Sharded with an index when max_shard_bytes is given."""
    config = hf_config_dict(model.cfg)
    if dtype is not None:
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
    write_hf_directory(hf_state_tensors(model, dtype), config, path, max_shard_bytes)
