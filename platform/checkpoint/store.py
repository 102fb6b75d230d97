"""Checkpoints that lose nothing on failure: safetensors shards plus JSON manifests, marker last.

Layout under `run_dir` (a local directory or `s3://bucket/prefix`, through platform.outputs.storage):

    checkpoints/step_00000100/
        rank0_0.safetensors   one file per writing rank (pp rank, dp rank); keys "{part}/{name}" (full-model names):
                              "model/layers.0.mlp.gate.e_score_correction_bias",
                              "optimizer/embed.weight/exp_avg", "rng/torch_cpu", ...
        rank0_0.json          that shard's manifest: sha256, byte size, parts, tensor dtypes/shapes
        meta.json             step, samples consumed, LR step, config hash, world layout, every
                              shard's manifest (so per-file sha256 and tensor list)
        COMPLETE              written LAST; holds meta.json's sha256

A directory without `COMPLETE` is never a checkpoint: a crash at any point leaves the previous
complete checkpoints untouched, and older ones are deleted only after a newer one is complete.

`state` is a mapping from a part name to something with `state_dict()` / `load_state_dict()`
returning / taking `{name: Tensor}` (an `nn.Module`, `OptimizerState`, `RNGState`) or to a plain
`{name: Tensor}` dict (restored in place). Nothing is pickled; loading reads only tensors and JSON.

Single process:
    save_checkpoint(run_dir, step, state, samples_consumed=..., keep=cfg.checkpoint.keep)
    path = latest_checkpoint(run_dir); meta = load_checkpoint(path, state)

Pipeline ranks (the contract with the pipeline runtime):
    1. every rank that owns state calls `save_shard(run_dir, step, state, shard=(pp_rank, dp_rank))`
       (its own file; no rank reads or waits for another here);
    2. the CALLER performs a barrier over all ranks (e.g. `torch.distributed.barrier()`);
    3. rank 0 alone calls `commit_checkpoint(run_dir, step, world={"pp": P, "dp": D}, ...)`, which
       checks every expected shard's manifest and file size, writes meta.json, then COMPLETE, then
       prunes old checkpoints.
    Ranks holding identical replicas may skip step 1 and commit with an explicit `shards=[...]` list.

Any layout reads any checkpoint: a state-dict value may be a `pieces.ShardedTensor`, a rank's
piece of a whole-model tensor; its manifest entry records `global_shape` and the flat `offset`, and
`platform.checkpoint.reshard.CheckpointReader` assembles what another layout needs from every
shard. `load_checkpoint(path, state, shard=...)` is the exact read of one shard's own tensors (the
rank-local parts, e.g. RNG, and same-layout tools).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from moeforge.platform.checkpoint.pieces import ShardedTensor
from moeforge.platform.checkpoint.state import CheckpointError
from moeforge.platform.outputs.storage import LocalStorage, Storage, _atomic_local_write, open_storage
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

CHECKPOINTS_DIR = "checkpoints"
META = "meta.json"
COMPLETE = "COMPLETE"
FORMAT = "moeforge-checkpoint/2"
# /1 recorded no global shape or offset: every tensor is read as a whole one (same-layout resume).
READABLE_FORMATS = ("moeforge-checkpoint/1", FORMAT)
_STEP_DIR = re.compile(r"step_(\d+)")

Shard = tuple[int, int]  # (pp rank, dp rank)

__all__ = [
    "CheckpointError",
    "CheckpointMeta",
    "checkpoint_path",
    "commit_checkpoint",
    "config_hash",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "locate",
    "prune_checkpoints",
    "read_meta",
    "save_checkpoint",
    "save_shard",
    "shard_file",
    "shard_name",
]


@dataclasses.dataclass
class CheckpointMeta:
    """What meta.json records. `shards` maps a shard name (`rank0_0`) to its manifest:
    {"file", "sha256", "bytes", "parts", "tensors": {key: {"dtype", "shape"}}}."""

    step: int
    samples_consumed: int  # the data sampler position: samples consumed by all ranks together
    lr_step: int  # the LR schedule's step (lr_at(lr_step) is the next step's LR)
    config_hash: str | None
    world: dict[str, int]
    shards: dict[str, dict[str, Any]]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    format: str = FORMAT
    saved_at: float = 0.0  # unix time of the commit
    path: str = ""  # where it was read from (not stored)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data.pop("path")
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, path: str) -> CheckpointMeta:
        data = json.loads(text)
        if data.get("format") not in READABLE_FORMATS:
            raise CheckpointError(
                f"{path}: format {data.get('format')!r}, this moeforge reads {', '.join(READABLE_FORMATS)}"
            )
        known = {f.name for f in dataclasses.fields(cls)} - {"path"}
        return cls(**{k: v for k, v in data.items() if k in known}, path=path)


# --- names -----------------------------------------------------------------------------------------


def shard_name(shard: Shard) -> str:
    """(pp rank, dp rank) -> "rank{pp}_{dp}", the file name stem of that rank's shard."""
    pp, dp = shard
    if int(pp) < 0 or int(dp) < 0:
        raise ValueError(f"shard {shard}: ranks must be >= 0")
    return f"rank{int(pp)}_{int(dp)}"


def _step_dir(step: int) -> str:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"{CHECKPOINTS_DIR}/step_{step:08d}"


def checkpoint_path(run_dir: str, step: int) -> str:
    """Where the checkpoint of `step` lives (complete or not)."""
    return f"{str(run_dir).rstrip('/')}/{_step_dir(step)}"


def _rel(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def locate(path: str, storage: Storage | None) -> tuple[Storage, str]:
    """The storage to use for `path` and `path` relative to its root. A given `storage` must be
    rooted at `path` or above it (pass the run's storage to avoid reopening S3 on every call)."""
    path = str(path).rstrip("/")
    if storage is None:
        return open_storage(path), ""
    if path == storage.root:
        return storage, ""
    if path.startswith(storage.root + "/"):
        return storage, path[len(storage.root) + 1 :]
    raise ValueError(f"{path}: not under the given storage root {storage.root}")


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of the config as canonical JSON: equal configs, equal hashes."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- save ------------------------------------------------------------------------------------------


def _flatten(
    state: Mapping[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[list[int], int]], list[str]]:
    """{part: Stateful | {name: Tensor | ShardedTensor}} -> ({"part/name": CPU tensor},
    {"part/name": (global shape, flat offset)}, part names). A plain tensor is a whole one."""
    out: dict[str, torch.Tensor] = {}
    placement: dict[str, tuple[list[int], int]] = {}
    storages: set[int] = set()
    for part, value in state.items():
        if not part or "/" in part:
            raise ValueError(f"state part name {part!r}: must be non-empty and contain no '/'")
        tensors = value.state_dict() if hasattr(value, "state_dict") else value
        if not isinstance(tensors, Mapping):
            raise TypeError(
                f"state[{part!r}]: expected a Stateful or a dict of tensors, got {type(value).__name__}"
            )
        for name, tensor in tensors.items():
            if isinstance(tensor, ShardedTensor):
                placement[f"{part}/{name}"] = (list(tensor.global_shape), tensor.offset)
                tensor = tensor.local
            elif isinstance(tensor, torch.Tensor):
                placement[f"{part}/{name}"] = (list(tensor.shape), 0)
            else:
                raise TypeError(f"state {part}/{name}: {type(tensor).__name__} is not a tensor")
            tensor = tensor.detach().cpu().contiguous()
            ptr = tensor.untyped_storage().data_ptr()
            if ptr in storages and tensor.numel():  # safetensors refuses tensors sharing memory
                tensor = tensor.clone()  # (views of one flat buffer, tied weights): store a copy
            storages.add(tensor.untyped_storage().data_ptr())
            out[f"{part}/{name}"] = tensor
    return out, placement, list(state)


def _put_safetensors(
    storage: Storage, rel: str, tensors: dict[str, torch.Tensor], metadata: dict
) -> tuple[str, int]:
    """Write `tensors` to `rel` atomically; return (sha256, bytes) of what was written."""
    written: list[tuple[str, int]] = []

    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata=metadata)
        written.append((_sha256_file(tmp), os.path.getsize(tmp)))

    if isinstance(storage, LocalStorage):
        _atomic_local_write(storage.url(rel), write)  # temp file beside the target, then rename
    else:
        with tempfile.TemporaryDirectory(prefix="moeforge-ckpt-") as tmpdir:
            tmp = os.path.join(tmpdir, os.path.basename(rel))
            write(tmp)
            storage.upload(tmp, rel)  # the object appears whole or not at all
    return written[0]


def save_shard(
    run_dir: str,
    step: int,
    state: Mapping[str, Any],
    *,
    shard: Shard = (0, 0),
    storage: Storage | None = None,
) -> str:
    """Write this rank's shard of checkpoint `step`: `rank{pp}_{dp}.safetensors`, then its manifest
    `rank{pp}_{dp}.json`. Does not make the checkpoint complete (see `commit_checkpoint`).

    If the checkpoint of `step` is already complete nothing is rewritten (rewriting would open a
    window with one complete checkpoint fewer); the path is returned either way."""
    storage, base = locate(run_dir, storage)
    folder = _rel(base, _step_dir(step))
    if storage.exists(_rel(folder, COMPLETE)):
        return storage.url(folder)
    tensors, placement, parts = _flatten(state)
    name = shard_name(shard)
    # A manifest left by an earlier, interrupted save of this step must not vouch for the new file.
    storage.delete(_rel(folder, name + ".json"))
    sha256, nbytes = _put_safetensors(
        storage,
        _rel(folder, name + ".safetensors"),
        tensors,
        {"format": "pt", "moeforge": FORMAT, "step": str(step)},
    )
    manifest = {
        "file": name + ".safetensors",
        "sha256": sha256,
        "bytes": nbytes,
        "parts": parts,
        # global_shape/offset: which elements of the whole model's tensor this is (`ShardedTensor`), so
        # any layout can read it (`reshard.CheckpointReader`)
        "tensors": {
            key: {
                "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape),
                "global_shape": placement[key][0],
                "offset": placement[key][1],
            }
            for key, t in sorted(tensors.items())
        },
    }
    storage.write_text(_rel(folder, name + ".json"), json.dumps(manifest, indent=1) + "\n")
    return storage.url(folder)


def commit_checkpoint(
    run_dir: str,
    step: int,
    *,
    world: Mapping[str, int],
    samples_consumed: int,
    lr_step: int | None = None,
    config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    shards: Sequence[Shard] | None = None,
    keep: int | None = None,
    storage: Storage | None = None,
) -> str:
    """Make checkpoint `step` complete: check the shards, write meta.json, then COMPLETE, then keep
    only the newest `keep` complete checkpoints (None keeps all). Rank 0 only, after a barrier.

    `world` records the layout (must hold "pp" and "dp"); the expected shards are every
    (pp, dp) pair unless `shards` lists them. `lr_step` defaults to `step`; `config` is hashed."""
    storage, base = locate(run_dir, storage)
    folder = _rel(base, _step_dir(step))
    if storage.exists(_rel(folder, COMPLETE)):
        return storage.url(folder)
    world = {k: int(v) for k, v in world.items()}
    if shards is None:
        if world.get("pp", 0) < 1 or world.get("dp", 0) < 1:
            raise ValueError(f"world {world}: needs 'pp' >= 1 and 'dp' >= 1 (or pass shards=[...])")
        shards = [(p, d) for p in range(world["pp"]) for d in range(world["dp"])]
    if not shards:
        raise ValueError("commit_checkpoint: no shards to commit")
    manifests = {}
    for shard in shards:
        name = shard_name(shard)
        manifest_rel = _rel(folder, name + ".json")
        try:
            manifest = json.loads(storage.read_text(manifest_rel))
        except FileNotFoundError:
            raise CheckpointError(
                f"{storage.url(manifest_rel)}: shard {name} was not written (every rank must finish "
                "save_shard before rank 0 commits)"
            ) from None
        file_rel = _rel(folder, manifest["file"])
        size = storage.size(file_rel)
        if size != manifest["bytes"]:
            raise CheckpointError(
                f"{storage.url(file_rel)}: {size} bytes on storage, its manifest says {manifest['bytes']}"
            )
        manifests[name] = manifest
    meta = CheckpointMeta(
        step=step,
        samples_consumed=int(samples_consumed),
        lr_step=step if lr_step is None else int(lr_step),
        config_hash=None if config is None else config_hash(config),
        world=world,
        shards=manifests,
        extra=dict(extra or {}),
        saved_at=time.time(),
    )
    text = meta.to_json()
    storage.write_text(_rel(folder, META), text)
    marker = {"meta_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
    storage.write_text(_rel(folder, COMPLETE), json.dumps(marker) + "\n")  # LAST: now it exists
    if keep is not None:
        prune_checkpoints(run_dir, keep, storage=storage)
    return storage.url(folder)


def save_checkpoint(
    run_dir: str,
    step: int,
    state: Mapping[str, Any],
    *,
    samples_consumed: int,
    lr_step: int | None = None,
    config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    keep: int | None = None,
    storage: Storage | None = None,
) -> str:
    """Single-process checkpoint: `save_shard` as rank (0, 0), then `commit_checkpoint` with world
    pp=1, dp=1. Returns the checkpoint's path."""
    storage, _ = locate(run_dir, storage)  # open S3 once for both halves
    save_shard(run_dir, step, state, storage=storage)
    return commit_checkpoint(
        run_dir,
        step,
        world={"pp": 1, "dp": 1},
        samples_consumed=samples_consumed,
        lr_step=lr_step,
        config=config,
        extra=extra,
        keep=keep,
        storage=storage,
    )


# --- find and prune --------------------------------------------------------------------------------


def _step_dirs(storage: Storage, base: str) -> dict[int, tuple[str, list[str]]]:
    """{step: (folder rel path, its files)} for every step_* folder, complete or not."""
    root = _rel(base, CHECKPOINTS_DIR)
    out: dict[int, tuple[str, list[str]]] = {}
    for rel in storage.list(root):
        inner = rel[len(root) + 1 :] if root else rel
        folder, _, _ = inner.partition("/")
        match = _STEP_DIR.fullmatch(folder)
        if match:
            out.setdefault(int(match.group(1)), (_rel(root, folder), []))[1].append(rel)
    if isinstance(storage, LocalStorage):
        # A writer killed while its first file was still a hidden temp (`.tmp-*`, which `list`
        # skips) leaves a step folder `list` does not show: find those too, so pruning removes them.
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for name in os.listdir(storage.url(root)):
                match = _STEP_DIR.fullmatch(name)
                if match:
                    out.setdefault(int(match.group(1)), (_rel(root, name), []))
    return out


def list_checkpoints(run_dir: str, storage: Storage | None = None) -> list[tuple[int, str]]:
    """Complete checkpoints as (step, path), oldest first."""
    storage, base = locate(run_dir, storage)
    return [
        (step, storage.url(folder))
        for step, (folder, files) in sorted(_step_dirs(storage, base).items())
        if _rel(folder, COMPLETE) in files
    ]


def latest_checkpoint(run_dir: str, storage: Storage | None = None) -> str | None:
    """The newest complete checkpoint's path, or None when there is none."""
    found = list_checkpoints(run_dir, storage)
    return found[-1][1] if found else None


def prune_checkpoints(run_dir: str, keep: int, storage: Storage | None = None) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints, and incomplete folders older than the
    newest complete one (leftovers of a crash; a save in progress is always newer). The marker
    goes first, so a half-deleted folder is never mistaken for a checkpoint. Returns deleted paths."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    storage, base = locate(run_dir, storage)
    dirs = _step_dirs(storage, base)
    complete = sorted(s for s, (folder, files) in dirs.items() if _rel(folder, COMPLETE) in files)
    if not complete:
        return []
    kept = set(complete[-keep:])
    deleted = []
    for step, (folder, files) in sorted(dirs.items()):
        if step in kept or step > complete[-1]:
            continue
        marker = _rel(folder, COMPLETE)
        for rel in sorted(files, key=lambda r: r != marker):
            storage.delete(rel)
        if isinstance(storage, LocalStorage):
            # ... and a killed writer's hidden temp files: no rank still writes a folder older than
            # the newest complete checkpoint (at most one checkpoint is ever in flight)
            shutil.rmtree(storage.url(folder), ignore_errors=True)
        deleted.append(storage.url(folder))
    return deleted


# --- load ------------------------------------------------------------------------------------------


def read_meta(path: str, storage: Storage | None = None) -> CheckpointMeta:
    """meta.json of the complete checkpoint at `path`, checked against the COMPLETE marker."""
    storage, folder = locate(path, storage)
    marker_rel, meta_rel = _rel(folder, COMPLETE), _rel(folder, META)
    try:
        marker = json.loads(storage.read_text(marker_rel))
    except FileNotFoundError:
        raise CheckpointError(
            f"{storage.url(marker_rel)}: missing, so {path} is not a complete checkpoint"
        ) from None
    try:
        text = storage.read_text(meta_rel)
    except FileNotFoundError:
        raise CheckpointError(f"{storage.url(meta_rel)}: missing (the checkpoint is damaged)") from None
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != marker.get("meta_sha256"):
        raise CheckpointError(f"{storage.url(meta_rel)}: sha256 does not match the COMPLETE marker (corrupt)")
    return CheckpointMeta.from_json(text, storage.url(folder))


@contextlib.contextmanager
def _local_file(storage: Storage, rel: str) -> Iterator[str]:
    """A local path holding the file `rel` (the file itself locally, a temp download for S3)."""
    if isinstance(storage, LocalStorage):
        path = storage.url(rel)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing (listed in {META})")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="moeforge-ckpt-") as tmpdir:
        path = os.path.join(tmpdir, os.path.basename(rel))
        try:
            storage.download(rel, path)
        except FileNotFoundError:
            raise CheckpointError(f"{storage.url(rel)}: missing (listed in {META})") from None
        yield path


@contextlib.contextmanager
def shard_file(storage: Storage, folder: str, entry: Mapping[str, Any], *, verify: bool = True) -> Iterator[str]:
    """A local path holding the shard `entry` (a manifest from meta.json) of the checkpoint folder
    `folder`; with `verify` its size and sha256 are checked against the manifest first, so a flipped
    byte or a truncated upload fails here naming the file."""
    file_rel = _rel(folder, entry["file"])
    where = storage.url(file_rel)
    with _local_file(storage, file_rel) as local:
        if verify:
            size = os.path.getsize(local)
            if size != entry["bytes"]:
                raise CheckpointError(
                    f"{where}: {size} bytes, {META} says {entry['bytes']} (truncated or corrupt)"
                )
            digest = _sha256_file(local)
            if digest != entry["sha256"]:
                raise CheckpointError(
                    f"{where}: sha256 {digest[:16]}... != {entry['sha256'][:16]}... in {META} (corrupt)"
                )
        yield local


def _restore(part: str, target: Any, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Load one part's tensors into its target, naming the key of any mismatch."""
    if isinstance(target, torch.nn.Module) or not hasattr(target, "load_state_dict"):
        expected = target.state_dict() if isinstance(target, torch.nn.Module) else target
        for key in sorted(set(tensors) - set(expected)):
            raise CheckpointError(f"{where}: {part}/{key}: in the checkpoint but not in the {part}")
        for key in expected:  # in the target's order, so the first mismatch reported is the first one
            if key not in tensors:
                raise CheckpointError(f"{where}: {part}/{key}: missing from the checkpoint")
            have, want = tuple(tensors[key].shape), tuple(expected[key].shape)
            if have != want:
                raise CheckpointError(
                    f"{where}: {part}/{key}: checkpoint shape {list(have)} != {part} shape {list(want)}"
                )
        if isinstance(target, torch.nn.Module):
            target.load_state_dict(tensors, strict=True)
        else:
            with torch.no_grad():
                for key, value in tensors.items():
                    target[key].copy_(value)
        return
    try:
        target.load_state_dict(tensors)
    except CheckpointError as err:
        raise CheckpointError(f"{where}: {part}: {err}") from None


def load_checkpoint(
    path: str,
    state: Mapping[str, Any],
    *,
    shard: Shard = (0, 0),
    verify: bool = True,
    storage: Storage | None = None,
) -> CheckpointMeta:
    """Restore every part named in `state` from this rank's shard of the complete checkpoint at
    `path`, and return its meta (step, samples_consumed, lr_step, ...).

    With `verify` the file's size and sha256 are checked first. A missing or corrupt file fails
    naming its path; a missing key, extra key or shape mismatch fails naming the key. Parts in the
    checkpoint that `state` does not name are not read (e.g. weights only: `{"model": model}`)."""
    meta = read_meta(path, storage)
    storage, folder = locate(path, storage)
    name = shard_name(shard)
    entry = meta.shards.get(name)
    if entry is None:
        raise CheckpointError(
            f"{meta.path}: no shard {name} (checkpoint world "
            f"{' '.join(f'{k}={v}' for k, v in sorted(meta.world.items()))}, shards {', '.join(sorted(meta.shards))})"
        )
    file_rel = _rel(folder, entry["file"])
    where = storage.url(file_rel)
    missing = [part for part in state if part not in entry["parts"]]
    if missing:
        raise CheckpointError(f"{where}: no '{missing[0]}' state (saved parts: {', '.join(entry['parts'])})")
    with shard_file(storage, folder, entry, verify=verify) as local:
        try:
            reader = safe_open(local, framework="pt")
        except (SafetensorError, OSError) as err:  # a bad header (only reachable with verify=False)
            raise CheckpointError(f"{where}: not a readable safetensors file ({err})") from None
        with reader as f:
            keys = list(f.keys())
            for part, target in state.items():
                prefix = part + "/"
                tensors = {k[len(prefix) :]: f.get_tensor(k) for k in keys if k.startswith(prefix)}
                _restore(part, target, tensors, where)
    return meta
