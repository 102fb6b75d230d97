"""Hugging Face DeepSeek-V3 checkpoints <-> moeforge `Transformer`, through safetensors only.

Layout read and written: `config.json` plus `model.safetensors` or shards with
`model.safetensors.index.json`; per-expert keys (`model.layers.N.mlp.experts.E.gate_proj.weight`),
which we stack into `RoutedExperts`; MTP modules at layer indices >= num_hidden_layers
(`model.layers.61.enorm/hnorm/eh_proj/shared_head.norm` plus the usual block keys; the copies of the
shared embedding and head stored there are written on save and ignored on load). FP8 e4m3 weights
with a `weight_scale_inv` of 128x128 block scales (the published checkpoint) are dequantised on load.

Writing is two steps so a caller can transform tensors in between (`platform.checkpoint.export.export_hf`
quantises to FP8 there): `hf_state_tensors(model)` gives {checkpoint key: tensor}, and
`write_hf_directory(tensors, config, path)` writes config.json and the safetensors files.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from moeforge.model.config import ModelConfig
from moeforge.model.transformer import Transformer
from safetensors.torch import save_file
from torch import nn

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
    out = torch.empty(weight.shape, dtype=torch.float32)
    dequantize_fp8_into(out, weight, scale_inv, block)
    return out


def dequantize_fp8_into(
    out: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> None:
    """`dequantize_fp8_blockwise` written into `out` (any float dtype) one block row at a time, so no
    full-size fp32 copy or scale matrix is ever held."""
    rows, cols = weight.shape
    bm, bn = block
    if tuple(scale_inv.shape) != (math.ceil(rows / bm), math.ceil(cols / bn)):
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not tile a {rows}x{cols} weight in {bm}x{bn} blocks"
        )
    for r in range(scale_inv.shape[0]):
        lo, hi = r * bm, min(rows, (r + 1) * bm)
        scale = scale_inv[r].float().repeat_interleave(bn)[:cols]  # [N]
        out[lo:hi] = weight[lo:hi].float() * scale


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
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def _safetensors_entries(file: Path) -> dict[str, _Entry]:
    """The tensors of one safetensors file, from its header only."""
    try:
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
    except (struct.error, ValueError) as err:  # too short, or not a JSON header
        raise CheckpointError(f"{file}: not a safetensors file ({err})") from None
    base = 8 + header_len
    return {
        k: _Entry(file, v["dtype"], tuple(v["shape"]), base + v["data_offsets"][0], base + v["data_offsets"][1])
        for k, v in header.items()
        if k != "__metadata__"
    }


class HFCheckpoint:
    """Tensor access to a Hugging Face safetensors directory (one file, or shards with an index),
    dequantising FP8 weights on the way.

    Each tensor is read with one positioned read into memory of its own, never through a mapping of
    the whole file: a reader's memory grows by what it keeps, plus the one tensor in flight. `used`
    collects the keys read (for the caller's unexpected-key check)."""

    def __init__(self, path: str | Path, block: tuple[int, int] = (128, 128)) -> None:
        self.path, self.block = Path(path), block
        index = self.path / "model.safetensors.index.json"
        self.entries: dict[str, _Entry] = {}
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            for f in sorted(set(weight_map.values())):
                if not (self.path / f).exists():
                    raise CheckpointError(f"{index}: shard {f} is missing")
            headers = {f: _safetensors_entries(self.path / f) for f in set(weight_map.values())}
            for k, f in weight_map.items():
                if k not in headers[f]:
                    raise CheckpointError(f"{k}: cannot be read from {f}: the index names it, the file lacks it")
                self.entries[k] = headers[f][k]
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.path}: no *.safetensors files (and no model.safetensors.index.json)")
            for f in files:
                for k, entry in _safetensors_entries(f).items():
                    if k in self.entries:
                        raise CheckpointError(f"{k}: stored in both {self.entries[k].file.name} and {f.name}")
                    self.entries[k] = entry
        self.used: set[str] = set()

    def keys(self):
        return self.entries.keys()

    def raw(self, key: str) -> torch.Tensor:
        """The tensor as stored (its own memory, its file's dtype)."""
        e = self.entries[key]
        dtype = _SAFETENSORS_DTYPES.get(e.dtype)
        if dtype is None:
            raise CheckpointError(f"{key}: dtype {e.dtype} in {e.file.name} is not supported")
        out = torch.empty(e.shape, dtype=dtype)
        nbytes = out.numel() * out.element_size()
        if nbytes != e.end - e.start:
            raise CheckpointError(f"{key}: cannot be read from {e.file.name}: {e.end - e.start} bytes for {nbytes}")
        if nbytes:
            with open(e.file, "rb") as f:
                f.seek(e.start)
                got = f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()))
            if got != nbytes:
                raise CheckpointError(f"{key}: cannot be read from {e.file.name}: file ends early")
        self.used.add(key)
        return out

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Write the weight `key` into `out` (its shape must match; any float dtype), dequantising an
        FP8 weight with its `weight_scale_inv`."""
        if key not in self.entries:
            raise CheckpointError(f"missing tensor {key!r} in the checkpoint")
        shape = self.entries[key].shape
        if shape != tuple(out.shape):
            raise CheckpointError(
                f"{key}: shape {shape} in the checkpoint, the config needs {tuple(out.shape)}"
            )
        t = self.raw(key)
        scale_key = key.removesuffix("weight") + "weight_scale_inv"
        if key.endswith(".weight") and scale_key in self.entries:
            dequantize_fp8_into(out, t, self.raw(scale_key), self.block)
        elif t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise CheckpointError(f"{key}: FP8 tensor without {scale_key}")
        else:
            out.copy_(t)

    def has_mtp(self, cfg: ModelConfig) -> bool:
        prefixes = tuple(f"model.layers.{i}." for i in _mtp_layer_ids(cfg, cfg.num_nextn_predict_layers))
        return bool(prefixes) and any(k.startswith(prefixes) for k in self.entries)


def read_hf_config(path: str | Path) -> tuple[dict, tuple[int, int]]:
    """A checkpoint directory's config.json and its FP8 block size."""
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{config_file}: not found")
    try:
        hf_cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file}: not valid JSON ({err})") from None
    block = tuple((hf_cfg.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
    return hf_cfg, block


@torch.no_grad()
def load_hf_into(module: nn.Module, checkpoint: HFCheckpoint, cfg: ModelConfig) -> None:
    """Fill every state entry of `module` from the checkpoint. `module` is the whole Transformer or
    any part of it under the full model's names (a pipeline rank's stages); routed experts are read
    for the rows the module holds only (`RoutedExperts.first_expert` onwards), each expert straight
    into its row."""
    for name, target in module.state_dict().items():
        keys = hf_keys(name, cfg)
        if isinstance(keys, list):  # stacked routed experts: this module's rows of the layer
            first = module.get_submodule(name.rsplit(".", 1)[0]).first_expert
            for row in range(target.shape[0]):
                checkpoint.read_into(keys[first + row], target[row])
        else:
            checkpoint.read_into(keys, target)


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
    hf_cfg, block = read_hf_config(path)
    cfg = ModelConfig.from_hf_dict(hf_cfg)
    checkpoint = HFCheckpoint(path, block)
    if with_mtp is None:
        with_mtp = checkpoint.has_mtp(cfg)
    if not with_mtp:
        cfg = cfg.replace(num_nextn_predict_layers=0)

    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    load_hf_into(model, checkpoint, cfg)
    for moe in model.moe_layers():
        moe.reset_load()  # non-persistent buffer, left uninitialised by to_empty
    if dtype != torch.float32:
        for name, t in model.state_dict(keep_vars=True).items():
            if not keeps_fp32(name):
                t.data = t.data.to(dtype)

    unexpected = sorted(
        k for k in set(checkpoint.keys()) - checkpoint.used if not _ignorable(k, cfg, with_mtp, hf_cfg)
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
