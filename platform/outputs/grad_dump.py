"""Every parameter's gradient at a run's first optimizer step, on disk: what the pipeline-vs-reference
tests compare tensor by tensor (`tests.pipeline_cases.assert_grads_match`).

With MOEFORGE_DUMP_GRADS naming a directory (a relative name is taken inside run.dir), the first
step of a fresh run writes each parameter's gradient as its optimizer step receives it, before
clipping, by full-model name, as safetensors:

    reference loop    single.safetensors: the whole model's accumulated gradients
    pipeline rank r   rank<r>.safetensors: its parameters' gradients reduced as its optimizer step
                      reduces them (plain_step.reduce_gradients: a DualPipe pair sums, dp
                      replicas average; ZeroStep hands DeepSpeed the same scaled gradients to
                      average), the tied embedding's already summed; routed experts as this EP
                      rank's rows of the whole layer

`load_grads(directory)` merges one run's files into whole tensors. Why per tensor: a scale error on
one small tensor (a router gate, a norm weight) barely moves the global norm, and AdamW divides a
constant scale out of that tensor's update, so only its gradient shows it. Unset, a step costs the
step-count comparison of the caller; the pipeline's extra reduction runs only while dumping.
"""

from __future__ import annotations

import json
import os
import struct

import torch
from moeforge.platform.optim.plain_step import reduce_gradients
from moeforge.platform.outputs.storage import Storage, is_s3, open_storage
from torch import nn

GRAD_DUMP_ENV = "MOEFORGE_DUMP_GRADS"
_LAYOUT = "layout"  # safetensors metadata: {name: [whole-model shape, flat offset of this piece]}


def _target(run_dir: str) -> tuple[Storage, str] | None:
    """(storage, folder inside it) named by MOEFORGE_DUMP_GRADS, or None when it is unset."""
    value = os.environ.get(GRAD_DUMP_ENV, "").strip()
    if not value:
        return None
    if os.path.isabs(value) or is_s3(value):
        return open_storage(value), ""
    return open_storage(run_dir), value


def _write(target: tuple[Storage, str], file_name: str, pieces: dict[str, tuple[torch.Tensor, tuple, int]]) -> None:
    from safetensors.torch import save

    storage, folder = target
    tensors = {name: g.detach().float().contiguous().cpu() for name, (g, _shape, _offset) in pieces.items()}
    layout = {name: [list(shape), offset] for name, (_g, shape, offset) in pieces.items()}
    rel = f"{folder}/{file_name}" if folder else file_name
    storage.write_bytes(rel, save(tensors, metadata={_LAYOUT: json.dumps(layout)}))


def dump_reference_grads(run_dir: str, model: nn.Module) -> None:
    """The one-process loop, before its clip: every parameter's `.grad` (zeros where none)."""
    target = _target(run_dir)
    if target is None:
        return
    pieces = {
        name: (p.grad if p.grad is not None else torch.zeros_like(p), tuple(p.shape), 0)
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    _write(target, "single.safetensors", pieces)


def dump_pipeline_grads(runtime, grads: dict[int, torch.Tensor]) -> None:
    """One pipeline rank (`RankEngine`), before its optimizer step: `grads` (id(param) ->
    gradient, left untouched) reduced by the optimizer step's own reduce_gradients. Collective over the shard and
    expert shard groups: every rank calls it at the same point of the step."""
    target = _target(runtime.cfg.run.dir)
    if target is None:
        return
    from moeforge.platform.checkpoint.reshard import model_layout

    parts = runtime.parts
    module, groups, placement = parts.rank_module, parts.groups, parts.placement
    params = [p for p in module.parameters() if p.requires_grad]
    expert_ids = set()
    if placement is not None:
        expert_ids = {id(p) for m in module.moe_layers() for p in m.experts.parameters()}
        layout = model_layout(module, placement.n_experts, placement.first_local_expert)
    else:
        layout = model_layout(module)
    reduced: dict[int, torch.Tensor] = {}
    for kind, members in (
        ("shard", [p for p in params if id(p) not in expert_ids]),
        ("expert_shard", [p for p in params if id(p) in expert_ids]),
    ):
        if not members:
            continue
        flat = reduce_gradients(  # a copy: `grads` stays as the step will use it
            [grads.get(id(p), torch.zeros_like(p)) for p in members], groups, parts.schedule.param_copies, kind
        )
        for p, g in zip(members, flat.split([p.numel() for p in members]), strict=True):
            reduced[id(p)] = g.view_as(p)
    pieces = {name: (reduced[id(p)], *layout[name]) for name, p in module.named_parameters() if id(p) in reduced}
    _write(target, f"rank{runtime.rank}.safetensors", pieces)


def _layout_of(data: bytes) -> dict[str, list]:
    """The layout metadata of a safetensors file's bytes (its header: 8-byte length, then JSON)."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(json.loads(data[8 : 8 + length])["__metadata__"][_LAYOUT])


def load_grads(directory: str) -> dict[str, torch.Tensor]:
    """One run's dumped gradients as whole-model tensors by name. Pieces written by several ranks
    (DualPipe pairs, dp replicas) hold the same reduced values; the first file's is kept. Raises
    when a tensor is not covered whole (an EP rank's file missing)."""
    from safetensors.torch import load

    storage = open_storage(directory)
    whole: dict[str, torch.Tensor] = {}
    covered: dict[str, torch.Tensor] = {}
    names = sorted(n for n in storage.list() if n.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"{directory}: no gradient files ({GRAD_DUMP_ENV})")
    for rel in names:
        data = storage.read_bytes(rel)
        layout = _layout_of(data)
        for name, piece in load(data).items():
            shape, offset = layout[name]
            if name not in whole:
                whole[name] = torch.zeros(shape, dtype=piece.dtype)
                covered[name] = torch.zeros(whole[name].numel(), dtype=torch.bool)
            span = slice(offset, offset + piece.numel())
            if not covered[name][span].any():
                whole[name].view(-1)[span] = piece.reshape(-1)
                covered[name][span] = True
    missing = [name for name, mask in covered.items() if not mask.all()]
    if missing:
        raise ValueError(f"{directory}: no file holds every part of {missing[:4]}")
    return whole
