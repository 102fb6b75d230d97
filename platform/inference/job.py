"""The moeforge-generate job: conf/generate.yaml's values -> checks -> load -> `generate` -> the
streamed completion or the JSONL file, and the statistics line (`moeforge.jobs.generate.main` is its
entry point).

    output = run_job(job_values(["run.dir=runs/tiny_cpu_dualpipe", "prompt=def main("]))

Every ConfigError comes before the first token; the CLI turns it into one line and exit status 2
(`platform.cli.run_cli`).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from moeforge.platform.config.builder import ConfigError
from moeforge.platform.inference.load import load_for_generation, resolve_device, resolve_dtype
from moeforge.platform.inference.requests import (
    PROMPT_KEY,
    PromptRecord,
    TextStreamer,
    check_settings,
    completion_records,
    encode_prompts,
    format_stats,
    output_target,
    read_prompts_file,
    write_jsonl,
)

CONFIG_NAME = "generate"  # conf/generate.yaml
JOB_KEYS = (
    "run", "hf_dir", "tokenizer", "prompt", "prompts_file", "out", "max_new_tokens", "temperature",
    "top_k", "top_p", "seed", "speculative", "device", "dtype",
)  # fmt: skip


def split_prompt_args(argv: Sequence[str]) -> tuple[list[str], str | None]:
    """(the other overrides, the prompt): `prompt=<text>` is taken verbatim, not parsed by Hydra,
    so a prompt may hold commas, quotes, brackets or `${...}`."""
    rest, prompt = [], None
    for arg in argv:
        if arg.startswith(PROMPT_KEY + "="):
            if prompt is not None:
                raise ConfigError("prompt: given more than once")
            prompt = arg[len(PROMPT_KEY) + 1 :]
        else:
            rest.append(arg)
    return rest, prompt


@dataclasses.dataclass
class JobOutput:
    """What the job prints once generation is done: `stdout` after everything else on stdout (the
    CLI adds its newline), `stderr` after that on stderr."""

    stdout: str
    stderr: str = ""


def job_values(argv: Sequence[str]) -> dict[str, Any]:
    """conf/generate.yaml composed with the key=value overrides (`platform.cli.compose_values`),
    the prompt taken verbatim (split_prompt_args)."""
    from moeforge.platform.cli import compose_values

    rest, prompt = split_prompt_args(argv)
    values, _ = compose_values(CONFIG_NAME, rest)
    if prompt is not None:
        values[PROMPT_KEY] = prompt
    return values


def run_job(
    values: Mapping[str, Any], *, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> JobOutput:
    """moeforge-generate: conf/generate.yaml's values -> checks -> load -> `generate`.

    With `prompt`, the completion is streamed to `stdout` as it is generated (JobOutput.stdout is
    empty: the line ends there) and the statistics line is for stderr; with `prompts_file`, the
    completions go to `out` (JSONL) and JobOutput.stdout holds the statistics. `out` may be given
    with `prompt` too. Every ConfigError comes before the first token."""
    from moeforge.platform.inference.generate import generate

    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    unknown = sorted(set(values) - set(JOB_KEYS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key (known: run.dir, {', '.join(JOB_KEYS[1:])})")
    run_dir = (values.get("run") or {}).get("dir")
    hf_dir, prompt, prompts_file, out = (values.get(k) for k in ("hf_dir", "prompt", "prompts_file", "out"))
    for key, value in (("run.dir", run_dir), ("hf_dir", hf_dir), ("tokenizer", values.get("tokenizer")),
                       ("prompts_file", prompts_file), ("out", out)):  # fmt: skip
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"{key}: must be a path, got {value!r}")
    if (prompt is None) == (prompts_file is None):
        both = "give one, not both" if prompt is not None else "give one"
        raise ConfigError(f"prompt / prompts_file: {both} (prompt='...' or prompts_file=<file.jsonl>)")
    if prompts_file is not None and out is None:
        raise ConfigError("out: required with prompts_file (out=<completions.jsonl>)")
    settings = {
        k: values.get(k) for k in ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "speculative")
    }
    check_settings(**settings)
    device, dtype = values.get("device", "cpu"), values.get("dtype", "float32")
    resolve_device(device)
    resolve_dtype(dtype)
    target = None if out is None else output_target(out)
    if prompts_file is not None:
        records = read_prompts_file(prompts_file)  # before the model is read: a bad line fails fast
    else:
        records = [PromptRecord({PROMPT_KEY: str(prompt)}, "prompt")]

    loaded = load_for_generation(
        run_dir=run_dir,
        hf_dir=hf_dir,
        tokenizer=values.get("tokenizer"),
        device=device,
        dtype=dtype,
        log=lambda line: print(line, file=stderr, flush=True),
    )
    speculative, max_new_tokens = settings["speculative"], settings["max_new_tokens"]
    ids = encode_prompts(
        loaded, [r.prompt for r in records], max_new_tokens, speculative, [r.where for r in records]
    )

    streamer = None
    if prompts_file is None:
        streamer = TextStreamer(loaded.tokenizer, lambda text: (stdout.write(text), stdout.flush()))
    result = generate(
        loaded.model,
        ids,
        max_new_tokens,
        temperature=float(settings["temperature"]),
        top_k=settings["top_k"],
        top_p=None if settings["top_p"] is None else float(settings["top_p"]),
        seed=settings["seed"],
        eos_id=loaded.eos_id,
        speculative=speculative,
        on_token=None if streamer is None else (lambda _row, token: streamer.push(token)),
    )
    lines = [format_stats(result.stats, speculative, result.cache_bytes_per_token)]
    if target is not None:
        written = write_jsonl(target, completion_records(loaded, records, ids, result))
        lines.append(f"wrote {len(records)} completion(s) to {written}")
    if streamer is not None:
        streamer.finish()
        return JobOutput(stdout="", stderr="\n".join(lines))
    return JobOutput(stdout="\n".join(lines))
