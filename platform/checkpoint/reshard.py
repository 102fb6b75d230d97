"""Read a checkpoint into any layout: pp=2 into pp=4, dp=2 into dp=1, DualPipe into 1F1B, ep=2 into
ep=1 and back, a pipeline run into the single-process loop and the reverse.

A checkpoint's model and optimizer state are layout-independent by construction
(`platform.checkpoint.pieces.ShardedTensor`): every tensor a rank wrote is recorded in meta.json with
the whole model's name, global shape and the flat offset of the elements it holds. `CheckpointReader`
indexes those pieces over every shard, and serves any run of elements of any tensor, assembled from
whichever shards hold it (replicas hold the same elements; the first one found serves them). Each
rank reads the elements of its own tensors only.

Two kinds of parts:
- global ("model", "optimizer"): keyed by full-model names; read through the reader in any layout;
- rank-local (anything else, today "rng"): meaningful only for the rank that wrote it, restored from
  the same shard when the layout is unchanged (`platform.checkpoint.resume.same_layout` decides).

Keys: `model/<parameter or buffer name>`, `optimizer/<parameter name>/<state key>` (AdamW's
`exp_avg`, `exp_avg_sq` with the parameter's shape, `step` a scalar), the same whoever wrote them
(the reference loop, `PlainStep`, DeepSpeed's ZeRO partitions in `ZeroStep`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Self

import torch
from moeforge.platform.checkpoint.pieces import ShardedTensor, rows_piece
from moeforge.platform.checkpoint.state import CheckpointError
from moeforge.platform.checkpoint.store import CheckpointMeta, locate, read_meta, shard_file
from moeforge.platform.outputs.storage import Storage
from safetensors import SafetensorError, safe_open
from torch import nn

GLOBAL_PARTS = ("model", "optimizer")

# {name: (global shape, flat offset)}: where each of a rank's tensors sits in the whole model's
Layout = dict[str, tuple[tuple[int, ...], int]]


@dataclass(frozen=True)
class _Piece:
    shard: str  # shard name in meta.json
    key: str  # the key inside that shard's file
    offset: int
    numel: int
    global_shape: tuple[int, ...]

    @property
    def stop(self) -> int:
        return self.offset + self.numel


class CheckpointReader:
    """Every global tensor of the complete checkpoint at `path`, whatever layout wrote it.

    Files are opened (and, with `verify`, checked against their sha256) the first time a tensor in
    them is needed; on S3 each needed shard is downloaded once. Use as a context manager, or call
    `close()`."""

    def __init__(self, path: str, storage: Storage | None = None, *, verify: bool = True) -> None:
        self.meta: CheckpointMeta = read_meta(path, storage)
        self.storage, self.folder = locate(path, storage)
        self.verify = verify
        self.pieces: dict[str, list[_Piece]] = {}
        for shard, entry in sorted(self.meta.shards.items()):
            for key, info in entry["tensors"].items():
                if key.partition("/")[0] not in GLOBAL_PARTS:
                    continue
                shape = tuple(info.get("global_shape", info["shape"]))  # format /1: whole tensors
                self.pieces.setdefault(key, []).append(
                    _Piece(shard, key, int(info.get("offset", 0)), math.prod(info["shape"]), shape)
                )
        self._stack = contextlib.ExitStack()
        self._open: dict[str, object] = {}
        self._state_keys: dict[str, list[str]] | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._open.clear()
        self._stack.close()

    @property
    def step(self) -> int:
        return self.meta.step

    def has(self, key: str) -> bool:
        return key in self.pieces

    def names(self, part: str) -> list[str]:
        """The tensor names under `part` ("model": parameter and buffer names)."""
        prefix = part + "/"
        return sorted(k[len(prefix) :] for k in self.pieces if k.startswith(prefix))

    def state_keys(self, name: str) -> list[str]:
        """The optimizer state keys saved for parameter `name` (empty: it never took a step)."""
        if self._state_keys is None:
            self._state_keys = {}
            for key in self.pieces:
                part, _, rest = key.partition("/")
                if part == "optimizer":
                    param, _, state_key = rest.rpartition("/")
                    self._state_keys.setdefault(param, []).append(state_key)
        return sorted(self._state_keys.get(name, []))

    def global_shape(self, key: str) -> tuple[int, ...]:
        return self._pieces_of(key)[0].global_shape

    def _pieces_of(self, key: str) -> list[_Piece]:
        found = self.pieces.get(key)
        if not found:
            raise CheckpointError(f"{self.meta.path}: {key}: missing from the checkpoint")
        return found

    def _file(self, shard: str):
        if shard not in self._open:
            entry = self.meta.shards[shard]
            local = self._stack.enter_context(
                shard_file(self.storage, self.folder, entry, verify=self.verify)
            )
            try:
                self._open[shard] = self._stack.enter_context(safe_open(local, framework="pt"))
            except (SafetensorError, OSError) as err:
                where = self.storage.url(f"{self.folder}/{entry['file']}")
                raise CheckpointError(f"{where}: not a readable safetensors file ({err})") from None
        return self._open[shard]

    def read_local(self, shard: str, part: str) -> dict[str, torch.Tensor]:
        """A rank-local part (e.g. "rng") of one shard, by key within the part."""
        entry = self.meta.shards.get(shard)
        if entry is None or part not in entry["parts"]:
            raise CheckpointError(f"{self.meta.path}: shard {shard} holds no '{part}' state")
        f = self._file(shard)
        prefix = part + "/"
        return {k[len(prefix) :]: f.get_tensor(k) for k in entry["tensors"] if k.startswith(prefix)}

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor `key` (1-D), from whichever pieces cover
        them. A run no shard holds fails naming the key and the gap."""
        pieces = self._pieces_of(key)
        total = math.prod(pieces[0].global_shape)
        stop = total if stop is None else stop
        if not 0 <= start <= stop <= total:
            raise CheckpointError(f"{self.meta.path}: {key}: elements [{start}, {stop}) outside 0..{total}")
        out: torch.Tensor | None = None
        pos = start
        while pos < stop:
            # the piece covering `pos` that reaches furthest: one read per contiguous run
            covering = [p for p in pieces if p.offset <= pos < p.stop]
            if not covering:
                raise CheckpointError(
                    f"{self.meta.path}: {key}: no shard holds element {pos} of {total} "
                    f"(shards: {', '.join(sorted({p.shard for p in pieces}))})"
                )
            piece = max(covering, key=lambda p: p.stop)
            end = min(stop, piece.stop)
            chunk = self._piece_run(piece, pos - piece.offset, end - piece.offset)
            if out is None:
                out = torch.empty(stop - start, dtype=chunk.dtype)
            out[pos - start : end - start] = chunk
            pos = end
        if out is None:  # an empty run: no element read, but the tensor's dtype
            first = pieces[0]
            return self._file(first.shard).get_tensor(first.key).reshape(-1)[:0].clone()
        return out

    def _piece_run(self, piece, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of one piece's flattened local tensor, reading from disk only the rows
        that hold them: a rank that takes a few experts' rows of a stacked weight, or one ZeRO
        partition's run of a moment, does not read the whole piece."""
        view = self._file(piece.shard).get_slice(piece.key)
        shape = view.get_shape()
        row = math.prod(shape[1:]) if shape else 0
        if row == 0:  # a scalar or an empty tensor: nothing to save by slicing
            return self._file(piece.shard).get_tensor(piece.key).reshape(-1)[lo:hi]
        first, last = lo // row, -(-hi // row)  # rows [first, last) cover elements [lo, hi)
        rows = view[first:last].reshape(-1)  # [(last - first) * row]
        return rows[lo - first * row : hi - first * row]

    def read_whole(self, key: str) -> torch.Tensor:
        """The whole tensor `key`, in its global shape."""
        return self.read(key).reshape(self.global_shape(key))

    def read_into(self, key: str, target: torch.Tensor, offset: int = 0) -> None:
        """Copy elements [offset, offset + target.numel()) of `key` into `target` (any shape)."""
        values = self.read(key, offset, offset + target.numel())
        with torch.no_grad():
            target.copy_(values.reshape(target.shape))


# --- what a rank holds -----------------------------------------------------------------------------


def model_layout(module: nn.Module, n_experts: int | None = None, first_expert: int = 0) -> Layout:
    """Where each tensor of `module.state_dict()` sits in the whole model: routed-expert weights of
    an expert-parallel rank are rows [first_expert, first_expert + local experts) of the stacked
    `[n_experts, ...]` weight; everything else is whole. `module` is a Transformer or a pipeline
    rank's module (full-model names), with `moe_layers()`."""
    expert_ids: set[int] = set()
    if n_experts is not None:
        expert_ids = {id(p) for m in module.moe_layers() for p in m.experts.parameters()}
    layout: Layout = {}
    named = dict(module.named_parameters())
    for name, tensor in module.state_dict().items():
        param = named.get(name)
        if param is not None and id(param) in expert_ids:
            piece = rows_piece(tensor, n_experts, first_expert)
            layout[name] = (piece.global_shape, piece.offset)
        else:
            layout[name] = (tuple(tensor.shape), 0)
    return layout


class ModelState:
    """A module as the "model" part: its state_dict as pieces of the whole model (`layout`)."""

    def __init__(self, module: nn.Module, layout: Layout | None = None) -> None:
        self.module = module
        self.layout = layout if layout is not None else model_layout(module)

    def state_dict(self) -> dict[str, ShardedTensor]:
        return {
            name: ShardedTensor(tensor, *self.layout[name])
            for name, tensor in self.module.state_dict().items()
        }

    def load_from(self, reader: CheckpointReader) -> None:
        """Every tensor of the module from the checkpoint, by name; a missing name or a global shape
        that differs fails naming the key. Checkpoint tensors this module does not hold (other
        stages, other experts) are not read."""
        for name, tensor in self.module.state_dict().items():
            shape, offset = self.layout[name]
            key = f"model/{name}"
            saved = reader.global_shape(key)
            if tuple(saved) != tuple(shape):
                raise CheckpointError(
                    f"{reader.meta.path}: {key}: checkpoint shape {list(saved)} != model shape {list(shape)}"
                )
            reader.read_into(key, tensor, offset)  # state_dict tensors share the parameters' storage


# --- the whole model, for export and debugging -----------------------------------------------------


def read_model_state(path: str, storage: Storage | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Every model tensor of the checkpoint at `path` in its whole shape, by full-model name, and the
    model config (a ModelConfig dict) the run recorded in meta.json."""
    with CheckpointReader(path, storage) as reader:
        model_cfg = reader.meta.extra.get("model")
        if model_cfg is None:
            raise CheckpointError(
                f"{reader.meta.path}: meta.json records no model config (written before moeforge kept one)"
            )
        return {name: reader.read_whole(f"model/{name}") for name in reader.names("model")}, model_cfg


def load_model_from_checkpoint(path: str, storage: Storage | None = None):
    """A whole `Transformer` (fp32, CPU) with the weights and router biases of the checkpoint at
    `path`, whatever layout wrote it."""
    from moeforge.model.config import ModelConfig
    from moeforge.model.transformer import Transformer
    from moeforge.platform.config.builder import build_config

    tensors, model_cfg = read_model_state(path, storage)
    model = Transformer(build_config(ModelConfig, model_cfg, "model"))
    missing = sorted(set(model.state_dict()) - set(tensors))
    if missing:
        raise CheckpointError(f"{path}: model/{missing[0]}: missing from the checkpoint")
    extra = sorted(set(tensors) - set(model.state_dict()))
    if extra:
        raise CheckpointError(f"{path}: model/{extra[0]}: in the checkpoint but not in the model")
    model.load_state_dict(tensors, strict=True)
    return model
