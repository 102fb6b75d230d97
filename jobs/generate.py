"""moeforge-generate: continue prompts with a trained moeforge model or a Hugging Face DeepSeek-V3
directory, streaming the text, or writing a JSONL file of completions.

    moeforge-generate run.dir=runs/tiny_cpu_dualpipe prompt='def main(' max_new_tokens=64
    moeforge-generate run.dir=runs/tiny_cpu_dualpipe prompt='import os' speculative=mtp
    moeforge-generate hf_dir=exports/tiny prompts_file=prompts.jsonl out=completions.jsonl
    moeforge-generate run.dir=s3://bucket/runs/v3 prompt='Hello' temperature=0.8 top_p=0.95 seed=1 device=cuda dtype=bfloat16

run.dir: a training run (local or s3://): its newest complete checkpoint (any pp/dp/ep layout) and
the tokenizer its data was prepared with. hf_dir: a Hugging Face DeepSeek-V3 directory instead, with
its tokenizer.json (or else the stdlib tokenizer, data/tokens/stdlib/tokenizer.json). tokenizer: a
tokenizer.json that replaces either. prompt: one prompt, taken verbatim (no Hydra quoting needed);
its continuation is streamed to stdout and the statistics go to stderr. prompts_file: a JSONL file
with one {"prompt": "..."} per line; the completions go to out= as JSONL ({"prompt", "completion",
"tokens", "prompt_tokens", "finish_reason"} plus the line's other fields), written under a temporary
name and renamed when whole, and the statistics (tokens/s, MTP acceptance rate, accepted drafts per
step) are printed. Decoding: max_new_tokens, temperature (0: greedy), top_k, top_p, seed,
speculative=none|mtp (MTP drafts verified by the main model: under greedy the same tokens), device
(cpu | cuda | cuda:N), dtype (float32 | bfloat16). Values and their defaults: conf/generate.yaml.

A bad input -- no or both of run.dir / hf_dir, a run without a complete checkpoint, a tokenizer with
more ids than the model, a prompt longer than the context, speculative=mtp on a model without MTP
modules, a missing prompts_file or a bad line in it (file and line named) -- ends before any token is
generated, in one line on stderr naming the cause, exit status 2. The work is
`platform.inference.job.run_job`'s (loading: `platform.inference.load.load_for_generation`, requests
and outputs: `platform.inference.requests`); decoding is `platform.inference.generate.generate`'s.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from moeforge.platform.checkpoint.state import CheckpointError
from moeforge.platform.cli import run_cli
from moeforge.platform.inference.job import JobOutput, job_values, run_job
from moeforge.platform.outputs.storage import StorageError

PROG = "moeforge-generate"


def main(argv: Sequence[str] | None = None) -> int:
    done: list[JobOutput] = []

    def run(args: Sequence[str]) -> str:
        done.append(run_job(job_values(args)))
        return done[-1].stdout

    # A damaged checkpoint or an unreachable run.dir is the user's input too: one line, exit 2.
    status = run_cli(PROG, __doc__, argv, run, errors=(CheckpointError, StorageError))
    if done and done[-1].stderr:  # after the streamed completion's line has ended
        print(done[-1].stderr, file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
