"""One pipeline rank's checkpoint I/O: its shard of every checkpoint.

A rank's shard holds its stage modules (weights and router-bias buffers, by full-model name, routed
experts as this EP rank's rows of the whole layer), its optimizer state by parameter name and its
RNG states. Model and optimizer are pieces of the whole model's tensors, so any layout resumes them
(`platform.checkpoint.reshard.CheckpointReader`); rank 0 commits the checkpoint once every shard is written.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from moeforge.platform.checkpoint.async_writer import AsyncCheckpointWriter
from moeforge.platform.checkpoint.reshard import ModelState, model_layout
from moeforge.platform.checkpoint.resume import checkpoint_commit, restore_checkpoint
from moeforge.platform.checkpoint.state import RNGState
from moeforge.platform.checkpoint.store import CheckpointMeta, checkpoint_path, commit_checkpoint, save_shard
from moeforge.platform.config.train import TrainConfig
from moeforge.platform.engine.rank_build import RankParts
from moeforge.platform.outputs.storage import Storage


class RankCheckpoints:
    """Writes and reads one rank's shards. With checkpoint.async every rank snapshots its state and
    writes it on a background thread (`writer`), and rank 0's writer commits once every shard's
    manifest is on storage (`platform.checkpoint.async_writer.AsyncCheckpointWriter`)."""

    def __init__(self, cfg: TrainConfig, parts: RankParts, log) -> None:
        self.cfg, self.parts = cfg, parts
        self.shard = (parts.pp_rank, parts.dp_rank)
        ck = cfg.checkpoint
        self.writer = (
            AsyncCheckpointWriter(cfg.run.dir, failure=ck.async_failure, log=log)  # the run log
            if ck.async_save and ck.every
            else None
        )

    def state(self) -> dict[str, Any]:
        """This rank's checkpoint parts (see the module docstring)."""
        placement, module = self.parts.placement, self.parts.rank_module
        if placement is None:
            layout = model_layout(module)
        else:
            layout = model_layout(module, placement.n_experts, placement.first_local_expert)
        return {"model": ModelState(module, layout), "optimizer": self.parts.opt.state(layout), "rng": RNGState()}

    def save(self, step: int, data_skip: int, wait: bool = False) -> str:
        """Every rank: write this rank's shard of the checkpoint of `step`; barrier; rank 0 commits it
        (meta.json, COMPLETE, pruning). With a background writer (and not `wait`) the shard is
        snapshot now and written later. Returns the checkpoint's path."""
        cfg, topo = self.cfg, self.parts.topo
        world = {"pp": topo.pp, "dp": topo.dp, "ep": topo.ep}
        commit = checkpoint_commit(cfg, step, data_skip, world, cfg.parallel.schedule)
        if self.writer is not None and not wait:
            mine = commit if self.parts.rank == 0 else None
            self.writer.submit(step, self.state(), shard=self.shard, commit=mine)
            return checkpoint_path(cfg.run.dir, step)
        path = save_shard(cfg.run.dir, step, self.state(), shard=self.shard)
        dist.barrier()  # every shard is written before rank 0 checks them
        if self.parts.rank == 0:
            path = commit_checkpoint(cfg.run.dir, step, **commit)
        return path

    def completed(self, wait: bool = False) -> list[tuple[int, str]]:
        """Background checkpoints completed since the last call (all in flight, with `wait`); a
        background failure raises here under checkpoint.async_failure=fail. Empty when writes are
        synchronous."""
        if self.writer is None:
            return []
        return self.writer.wait() if wait else self.writer.poll()

    def load(self, path: str, storage: Storage | None = None) -> tuple[CheckpointMeta, bool]:
        """Restore this rank's part of the checkpoint at `path` (any layout wrote it); return its meta
        and whether the layout was the same (only then are the RNG states restored)."""
        return restore_checkpoint(self.cfg, path, self.state(), shard=self.shard, storage=storage)
