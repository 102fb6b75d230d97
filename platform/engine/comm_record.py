"""Record every torch.distributed call a process makes, in posting order, for the NCCL-order check.

gloo matches a receive to a send by (source, tag) and progresses each transfer on its own, so a
CPU run completes whatever order the ranks post their transfers in. NCCL does not: it runs the
ungrouped point-to-point ops of one (process group, pair of ranks) in posting order on one stream,
and every member of a group must issue its collectives in the same order. A gloo run can therefore
pass while the same code would hang on GPUs. Recording what each rank really posts, and holding
the record to NCCL's rules (`moeforge.platform.engine.nccl_rules`), makes a CPU pass mean
something for a GPU run.

`start_recording(directory)` wraps the point-to-point and collective functions of
`torch.distributed` in this process (idempotent) and appends one JSON line per call to
`<directory>/comm.<pid>.jsonl`, flushed at once (a rank that is killed loses nothing it posted).
Each line: the world rank at the time of the call, a per-process sequence number, the function,
the process group (its name and world ranks; after the process destroyed its default group, as
a worker renumbered by the placement does, the name carries the count: "0/1"), for point-to-point the peer and the bytes, for
collectives the size of the tensor where every member must pass the same one, and the call site
outside torch. Calls made inside another recorded call (all_gather_object's own all_gather) are
not recorded twice. It must be started before DeepSpeed creates its communication backend, which
keeps references to some of these functions.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import threading

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

POINT_TO_POINT = ("isend", "irecv", "send", "recv")
# Collectives whose tensor argument has the same size on every member (recorded for the check).
SAME_SIZE_COLLECTIVES = {"all_reduce": "tensor", "broadcast": "tensor", "reduce": "tensor"}
COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
    "barrier",
    "monitored_barrier",
    "all_gather_object",
    "broadcast_object_list",
    "gather_object",
    "scatter_object_list",
)

RECORD_ENV = "MOEFORGE_RECORD_COMM"
_state = threading.local()
_lock = threading.Lock()
_recorder: _Recorder | None = None


class _Recorder:
    def __init__(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.path = os.path.join(directory, f"comm.{os.getpid()}.jsonl")
        # Line-buffered and open for the process's life: each call is on disk at once.
        self.file = open(self.path, "a", buffering=1)  # noqa: SIM115
        self.seq = 0

    def write(self, entry: dict) -> None:
        with _lock:
            entry["seq"] = self.seq
            self.seq += 1
            self.file.write(json.dumps(entry, separators=(",", ":")) + "\n")


# How many times this process destroyed its default process group (as a worker does when the
# placement renumbers the ranks). A group made after that is another group even where torch gives
# it the same name again, so its name is recorded with the count: "0" before, "0/1" after.
_world_generation = 0


def _group_fields(group) -> dict:
    pg = group if group is not None else c10d._get_default_group()
    name = pg.group_name if _world_generation == 0 else f"{pg.group_name}/{_world_generation}"
    return {"group": name, "members": dist.get_process_group_ranks(pg)}


def _count_world_destruction(original):
    @functools.wraps(original)
    def destroy_process_group(group=None):
        global _world_generation
        original(group)
        if group is None:
            _world_generation += 1

    destroy_process_group.__moeforge_recorded__ = original
    return destroy_process_group


def _call_site() -> str:
    """The innermost frame outside torch and this module: who posted the call."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if f"{os.sep}torch{os.sep}" not in name and name != __file__:
            return f"{_short(name)}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _short(path: str) -> str:
    """A source path relative to the code root or to site-packages, for messages."""
    if path.startswith(_ROOT + os.sep):
        return os.path.relpath(path, _ROOT)
    return path.split("site-packages" + os.sep, 1)[-1]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _wrap(name: str, original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def recorded(*args, **kwargs):
        if getattr(_state, "depth", 0) or _recorder is None:
            return original(*args, **kwargs)
        # Written before the call: a call that never returns (a hang) is still on record.
        _recorder.write(_describe(name, signature.bind(*args, **kwargs).arguments))
        _state.depth = 1
        try:
            return original(*args, **kwargs)
        finally:
            _state.depth = 0

    recorded.__moeforge_recorded__ = original
    return recorded


def _describe(name: str, arguments: dict) -> dict:
    entry = {"rank": dist.get_rank(), "op": name, "site": _call_site()}
    if name == "batch_isend_irecv":
        ops = arguments["p2p_op_list"]
        entry.update(_group_fields(ops[0].group if ops else None))
        entry["ops"] = [
            {"op": op.op.__name__, "peer": op.peer, "bytes": _nbytes(op.tensor)} for op in ops
        ]
        return entry
    entry.update(_group_fields(arguments.get("group")))
    if name in POINT_TO_POINT:
        peer = arguments.get("dst", arguments.get("src"))
        entry.update(peer=peer, bytes=_nbytes(arguments["tensor"]))
    elif name in SAME_SIZE_COLLECTIVES:
        entry["numel"] = arguments[SAME_SIZE_COLLECTIVES[name]].numel()
    return entry


def start_recording(directory: str) -> str:
    """Record this process's torch.distributed calls into `directory`; returns this process's file.
    Calling it again (same process) keeps the first directory."""
    global _recorder
    if _recorder is not None:
        return _recorder.path
    _recorder = _Recorder(directory)
    for name in (*POINT_TO_POINT, "batch_isend_irecv", *COLLECTIVES):
        original = getattr(c10d, name, None)
        if original is None or hasattr(original, "__moeforge_recorded__"):
            continue
        wrapped = _wrap(name, original)
        setattr(c10d, name, wrapped)
        if getattr(dist, name, None) is original:
            setattr(dist, name, wrapped)
    if not hasattr(c10d.destroy_process_group, "__moeforge_recorded__"):
        counted = _count_world_destruction(c10d.destroy_process_group)
        if dist.destroy_process_group is c10d.destroy_process_group:
            dist.destroy_process_group = counted
        c10d.destroy_process_group = counted
    return _recorder.path


def record_comm_from_env() -> str | None:
    """Start recording when MOEFORGE_RECORD_COMM names a directory (a debugging aid for a run that
    hangs on GPUs, and what the NCCL-order tests use); returns this process's file, or None."""
    directory = os.environ.get(RECORD_ENV, "").strip()
    return start_recording(directory) if directory else None
