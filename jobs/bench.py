"""moeforge-bench: run one benchmark suite, print its table, write its JSON report.

    moeforge-bench kernels [hydra overrides]       # FP8 kernels, activation memory (conf/bench_kernels.yaml)
    moeforge-bench data [hydra overrides]          # Ray Data tokenization vs one process (conf/bench_data.yaml)
    moeforge-bench convergence [hydra overrides]   # final losses per precision policy and seed (conf/bench_convergence.yaml)
    moeforge-bench pipeline [hydra overrides]      # the executor vs the simulator, pipeline vs one process (conf/bench_pipeline.yaml)
    moeforge-bench ep [hydra overrides]            # EP dispatch/combine all-to-all (conf/bench_ep.yaml)
    moeforge-bench overlap [hydra overrides]       # DualPipe's overlapped F&B vs torch (conf/bench_overlap.yaml)
    moeforge-bench checkpoint [hydra overrides]    # step-time cost of sync vs async checkpoints (conf/bench_checkpoint.yaml)
    moeforge-bench generate [hydra overrides]      # MTP speculative vs plain greedy decoding (conf/bench_generate.yaml)

Each suite is a Hydra config `conf/bench_<suite>.yaml` (composed with Hydra's compose API from the
`moeforge.conf` package) and a function `module:function` that takes the composed config as a plain
dict and returns the text to print. To add a suite, add one line to SUITES and its YAML. A bad value
ends in one line on stderr and exit status 2.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from moeforge.platform.cli import compose_values, run_cli

PROG = "moeforge-bench"
SUITES: dict[str, str] = {
    "kernels": "moeforge.platform.bench.kernels:run_job",
    "data": "moeforge.platform.bench.data:run_job",
    "convergence": "moeforge.platform.bench.convergence:run_job",
    "pipeline": "moeforge.platform.bench.pipeline:run_job",
    "ep": "moeforge.platform.bench.ep:run_job",
    "overlap": "moeforge.platform.bench.overlap:run_job",
    "checkpoint": "moeforge.platform.bench.checkpoint:run_job",
    "generate": "moeforge.platform.bench.generate:run_job",
}


def _usage() -> str:
    return f"usage: {PROG} <suite> [hydra overrides]   suites: {', '.join(SUITES)}"


def run(suite: str, overrides: Sequence[str]) -> str:
    """Compose conf/bench_<suite>.yaml with the overrides and run the suite; return its text."""
    module_name, function_name = SUITES[suite].split(":")
    values = compose_values(f"bench_{suite}", overrides)[0]
    return getattr(importlib.import_module(module_name), function_name)(values)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\n" + _usage())
        return 0 if argv else 2
    suite, overrides = argv[0], argv[1:]
    if suite not in SUITES:
        print(f"{PROG}: error: unknown suite {suite!r}. {_usage()}", file=sys.stderr)
        return 2
    return run_cli(PROG, __doc__, overrides, lambda rest: run(suite, rest), errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
