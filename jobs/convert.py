"""moeforge-convert: export a moeforge training checkpoint as a Hugging Face DeepSeek-V3 directory.

    moeforge-convert checkpoint=runs/tiny/checkpoints/step_00000100 out=exports/tiny
    moeforge-convert checkpoint=runs/tiny out=exports/tiny-fp8 fp8=true dtype=bfloat16
    moeforge-convert checkpoint=s3://bucket/runs/v3 out=exports/v3 max_shard_gb=5

checkpoint: a step directory, or a run directory for its newest complete checkpoint (local or s3://,
any pp/dp/ep layout). out: a local directory that does not exist or is empty; it is written as
<out>.partial and renamed when complete. fp8=true writes the published FP8 format (float8_e4m3fn
projection weights with float32 128x128 `weight_scale_inv`); dtype (float32 | bfloat16 | float16)
is that of every other tensor, the router excepted. Values come from conf/convert.yaml (read with
OmegaConf, not Hydra's compose: `checkpoint` is also a Hydra config group); a bad one
ends in one line on stderr naming it, exit status 2. The work is
`platform.checkpoint.export.run_job`'s.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from moeforge.platform.checkpoint.export import ExportError, job_values, run_job
from moeforge.platform.checkpoint.state import CheckpointError
from moeforge.platform.cli import run_cli
from moeforge.platform.outputs.storage import StorageError

PROG = "moeforge-convert"


def run(argv: Sequence[str]) -> str:
    """conf/convert.yaml with the key=value overrides -> the export; returns the summary line."""
    return run_job(job_values(argv))


def main(argv: Sequence[str] | None = None) -> int:
    # A checkpoint that is damaged or unreachable is the user's input too: one line, exit 2.
    return run_cli(PROG, __doc__, argv, run, errors=(ExportError, CheckpointError, StorageError))


if __name__ == "__main__":
    sys.exit(main())
