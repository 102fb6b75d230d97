"""Data benchmark (`moeforge-bench data`): tokens/s of the Ray Data tokenization pipeline against a single-process loop over
the same files with the same tokenizer.

Both methods read the input bytes, parse documents and tokenize them (one thread per process:
TOKENIZERS_PARALLELISM=false, as each Ray task holds one CPU). The Ray Data figure is measured twice:
`cold` includes starting the workers of a fresh pipeline, `warm` is a second run. Connecting to Ray
(`RaySession`: `platform.launch.ray_connection.connect_ray`, which may start a local cluster) is
excluded and reported on its own. Prints a table and writes JSON.
"""

from __future__ import annotations

import json
import os
import platform as std_platform
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from moeforge.platform.config.builder import build, require
from moeforge.platform.data.corpus import discover, read_input
from moeforge.platform.data.prepare import (
    PrepareConfig,
    RaySession,
    tokenize_file,
    tokenize_windows,
    training_texts,
)
from moeforge.platform.data.tokenizer import eos_id, load_tokenizer, train_bpe
from moeforge.platform.outputs.storage import write_text_file


@dataclass
class DataBenchConfig:
    inputs: list[str] = field(default_factory=lambda: ["stdlib"])
    max_files: int | None = 200
    max_bytes: int | None = None
    tokenizer: str | None = None  # tokenizer.json; None trains byte-level BPE first (not timed)
    vocab_size: int = 4096
    batch_files: int = 4
    num_cpus: int | None = None  # local Ray cluster size when none is connected
    output: str = "bench/data_tokenize.json"  # local path or s3:// URL

    def __post_init__(self) -> None:
        require(self.max_files is None or self.max_files >= 1, "max_files", "must be >= 1 or null")
        require(self.max_bytes is None or self.max_bytes >= 1, "max_bytes", "must be >= 1 or null")
        require(self.batch_files >= 1, "batch_files", "must be >= 1")
        require(bool(self.output), "output", "must be a file path or s3:// URL")


def _single_process(files, tok, cfg: PrepareConfig) -> tuple[int, float]:
    eos = eos_id(tok)
    started = time.perf_counter()
    tokens = 0
    for f in files:
        out = tokenize_file(f.uri, f.kind, read_input(f), tok, eos, cfg)
        tokens += len(out["train"]) + len(out["val"])
    return tokens, time.perf_counter() - started


def _ray_data(ray, files, tok, cfg: PrepareConfig) -> tuple[int, float]:
    counted = [0]

    def consume(index, counts, train, val):
        counted[0] += counts[0] + counts[1]

    started = time.perf_counter()
    tokenize_windows(ray, files, 0, tok, cfg, consume)
    return counted[0], time.perf_counter() - started


def run(cfg: Mapping[str, Any] | DataBenchConfig | None = None, log: Callable[[str], None] = print) -> dict:
    """Measure, log the table, write JSON to cfg.output; return the results."""
    if not isinstance(cfg, DataBenchConfig):
        cfg = build(DataBenchConfig, dict(cfg or {}), "bench.data")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before Ray starts: workers inherit it
    prep = PrepareConfig(inputs=cfg.inputs, max_files=cfg.max_files, max_bytes=cfg.max_bytes,
                         vocab_size=cfg.vocab_size, batch_files=cfg.batch_files, num_cpus=cfg.num_cpus,
                         tokenizer=cfg.tokenizer, val_fraction=0.0)
    files = discover(prep.inputs, tuple(prep.extensions), prep.max_files, prep.max_bytes, prep.s3())
    tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else train_bpe(training_texts(files, prep), cfg.vocab_size)
    input_bytes = sum(f.size for f in files)

    rows = []
    tokens, seconds = _single_process(files, tok, prep)
    rows.append({"method": "single process", "workers": 1, "tokens": tokens, "seconds": seconds})
    started = time.perf_counter()
    with RaySession(cfg.num_cpus) as ray:
        init_s = time.perf_counter() - started
        cpus = int(ray.cluster_resources().get("CPU", 1))
        for label in ("ray data (cold)", "ray data (warm)"):
            count, seconds = _ray_data(ray, files, tok, prep)
            if count != tokens:
                raise RuntimeError(f"{label} produced {count} tokens, the single process {tokens}")
            rows.append({"method": label, "workers": cpus, "tokens": count, "seconds": seconds})
    base = rows[0]["tokens"] / rows[0]["seconds"]
    for row in rows:
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
        row["speedup"] = row["tokens_per_s"] / base

    result = {
        "benchmark": "data_tokenize",
        "config": asdict(cfg),
        "files": len(files),
        "input_bytes": input_bytes,
        "vocab_size": tok.get_vocab_size(),
        "ray_init_s": init_s,
        "host": {"cpus": os.cpu_count(), "python": std_platform.python_version()},
        "rows": rows,
    }
    log(format_table(result))
    write_text_file(cfg.output, json.dumps(result, indent=2) + "\n")
    log(f"wrote {cfg.output}")
    return result


def run_job(values: Mapping[str, Any]) -> str:
    """`moeforge-bench data`: the composed conf/bench_data.yaml in, the text to print out."""
    lines: list[str] = []
    run(values, log=lines.append)
    return "\n".join(lines)


def format_table(result: dict) -> str:
    title = (f"tokenization: {result['files']} files, {result['input_bytes'] / 1e6:.1f} MB, vocab "
             f"{result['vocab_size']} (Ray cluster start-up {result['ray_init_s']:.1f}s, not counted)")
    lines = [
        title,
        f"{'method':<18} {'workers':>7} {'tokens':>12} {'seconds':>8} {'tokens/s':>12} {'speedup':>8}",
    ]
    for r in result["rows"]:
        lines.append(f"{r['method']:<18} {r['workers']:>7} {r['tokens']:>12,} {r['seconds']:>8.2f} "
                     f"{r['tokens_per_s']:>12,.0f} {r['speedup']:>7.2f}x")
    return "\n".join(lines)
