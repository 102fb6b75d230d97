"""A checkpoint writer run as its own process by tests/test_checkpoint_crash.py, which SIGKILLs it.

    python tests/checkpoint_writer_proc.py RUN_DIR --step 2 --mib 256 --shards 2 [--pause S] [--part-mib P]

Writes checkpoint STEP under RUN_DIR (a local folder or s3://bucket/prefix) the way pipeline ranks
do: `save_shard` for (0, 0), (1, 0), ... then `commit_checkpoint` with world pp=SHARDS, dp=1. Each
shard holds one float32 tensor of MIB MiB (filled with step + pp rank, so a test can tell whose
data it loaded) and a small counter. `--pause` sleeps between the last shard and the commit: a
test-side way to hold the process at "every shard written, no COMPLETE yet" (nothing in the
production code waits). `--part-mib` (S3 only) sets boto3's multipart threshold and part size, so a
small shard is still uploaded in several parts. Prints one line per stage, flushed, for the log.
"""

from __future__ import annotations

import argparse
import time

import torch
from moeforge.platform.checkpoint.store import commit_checkpoint, save_shard
from moeforge.platform.outputs.storage import S3Options, is_s3, open_storage


def shard_state(step: int, pp: int, mib: float) -> dict:
    """The state shard (pp, 0) of `step` holds (the test rebuilds it to compare)."""
    numel = max(4, int(mib * (1 << 20)) // 4)
    return {
        "model": {"big": torch.full((numel,), float(step + pp))},
        "extra": {"counter": torch.tensor([step], dtype=torch.int64)},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--step", type=int, required=True)
    parser.add_argument("--mib", type=float, required=True)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument("--part-mib", type=int, default=0)
    args = parser.parse_args()
    storage = None  # opened from the URL alone: endpoint and keys from the AWS environment
    if args.part_mib and is_s3(args.run_dir):
        part = args.part_mib << 20
        storage = open_storage(args.run_dir, S3Options(multipart_threshold=part, multipart_chunksize=part))
    print("started", flush=True)
    for pp in range(args.shards):
        save_shard(
            args.run_dir, args.step, shard_state(args.step, pp, args.mib), shard=(pp, 0), storage=storage
        )
        print(f"shard {pp} written", flush=True)
    if args.pause:
        time.sleep(args.pause)
    world = {"pp": args.shards, "dp": 1}
    commit_checkpoint(args.run_dir, args.step, world=world, samples_consumed=args.step, storage=storage)
    print("committed", flush=True)


if __name__ == "__main__":
    main()
