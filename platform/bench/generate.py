"""MTP speculative decoding (`moeforge-bench generate`): how much faster is greedy decoding when the
model's own MTP modules draft the next tokens, and what limits it?

    corpus      a prepared stdlib token directory (`data_path`, e.g. data/tokens/stdlib from
                moeforge-prepare), or, when none is given, the first `prepare_max_files` stdlib files
                prepared once by moeforge-prepare's `prepare()` into cache_dir (`generate_model.corpus_dir`)
    train       the model (tiny by default, MTP depth >= 1) for `train_steps` steps with the reference
                run (Trainer.single(cfg).train()); its final checkpoint is kept in cache_dir under a key
                of everything that decides the weights, so a rerun loads it instead of training
    prompts     `prompt_len`-token windows of the corpus's val split (documents moeforge-prepare held
                out by a seeded hash: never trained on), spread evenly over it
    decode      per batch size b, on the same prompts (all of them, b at a time), in this process: a
                warm-up, then `repeats` rounds
                timing plain greedy and MTP speculative greedy in turn
                (`platform.inference.generate.generate`, speculative="none" / "mtp"); medians
    explain     per step at that batch (`platform.bench.generate_costs.step_costs`): the main model's decode
                forward (1 token), its verify forward (1 + D tokens) and the drafts (D MTP module
                forwards), so that
                    expected speedup = step ratio * t_decode / (t_verify + t_draft)
                with step ratio = plain forwards / speculative forwards on the same prompts. At
                batch 1 that is the tokens per step (1 + accepted drafts); in a batch it is less,
                because a batch takes as many steps as its slowest row
                stands next to the measured one

Greedy speculative decoding must return exactly the plain tokens; the report records whether it
did (`identical`), and the first differing position of each row that did not, rather than asserting,
next to both modes' tokens per prompt (`plain.tokens`, `speculative.tokens`), from which a reader or
a test recomputes the verdict.
DeepSeek-V3 reports 85-90% acceptance of the second token and 1.8x tokens/s with one MTP module.
Timings are measured, never asserted. Prints a table, writes JSON (`platform.bench.report.write_report`).
"""

from __future__ import annotations

import os
import platform as std_platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from moeforge.model.config import ModelConfig
from moeforge.platform.bench.generate_costs import step_costs, sync
from moeforge.platform.bench.generate_model import corpus_dir, held_out_prompts, trained_model
from moeforge.platform.bench.report import write_report
from moeforge.platform.config.builder import ConfigError, build, build_config, require
from moeforge.platform.config.presets import preset_exists, preset_values
from moeforge.platform.data.shards import MANIFEST, read_manifest
from moeforge.platform.inference.generate import GenerationStats, generate

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
V3_ACCEPTANCE = (0.85, 0.90)  # DeepSeek-V3: acceptance of the second token with one MTP module
V3_SPEEDUP = 1.8  # DeepSeek-V3: tokens/s with MTP speculative decoding vs without


@dataclass
class GenerateBenchConfig:
    """conf/bench_generate.yaml (every value documented there)."""

    # (not `model`/`precision`/`data`: Hydra would read those overrides as its config groups)
    model_name: str = "tiny"  # conf/model/<model_name>.yaml
    model_overrides: dict[str, Any] = field(default_factory=dict)  # model fields over the preset's
    seq_len: int | None = None  # training sequence length; None: the model config's
    train_steps: int = 600
    global_batch: int = 8
    precision_name: str = "fp32"  # conf/precision/<name>.yaml, for training
    data_path: str | None = None  # a prepared token directory; None: prepare the stdlib subset below
    prepare_max_files: int = 300  # stdlib files prepared into cache_dir when data_path is None
    prepare_vocab_size: int = 4096
    prepare_val_fraction: float = 0.02  # documents held out (the prompts' source); moeforge-prepare's default
    prompt_len: int = 64
    max_new_tokens: int = 64
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    repeats: int = 3  # timed runs per mode and batch size, after one warm-up run
    cost_repeats: int = 20  # timed calls per forward in the per-step cost measurement
    dtype: str = "float32"  # inference weights and caches
    device: str = "auto"  # auto: the GPU when torch sees one
    seed: int = 1234
    log_every: int = 50
    threads: int | None = None  # torch intra-op threads; None leaves torch's default
    cache_dir: str | None = None  # trained checkpoints and the prepared corpus; None: beside output
    output: str = "runs/bench/generate.json"  # local path or s3:// URL

    def __post_init__(self) -> None:
        self.batch_sizes = list(self.batch_sizes)
        require(
            preset_exists("model", self.model_name), "model_name", f"no conf/model/{self.model_name}.yaml"
        )
        require(
            preset_exists("precision", self.precision_name),
            "precision_name",
            f"no conf/precision/{self.precision_name}.yaml",
        )
        require(
            self.seq_len is None or self.seq_len >= 2, "seq_len", f"must be >= 2 or null, got {self.seq_len}"
        )
        try:
            model = self.model_config()
        except ConfigError as err:
            raise ConfigError(f"model_overrides: {err}") from None
        require(
            model.num_nextn_predict_layers >= 1,
            "model_overrides",
            "num_nextn_predict_layers must be >= 1: speculative decoding drafts with the MTP modules",
        )
        require(self.train_steps >= 1, "train_steps", f"must be >= 1, got {self.train_steps}")
        require(self.global_batch >= 1, "global_batch", f"must be >= 1, got {self.global_batch}")
        require(
            self.prepare_max_files >= 1, "prepare_max_files", f"must be >= 1, got {self.prepare_max_files}"
        )
        require(
            256 < self.prepare_vocab_size <= model.vocab_size,
            "prepare_vocab_size",
            f"must lie in (256, the model's vocab_size {model.vocab_size}], got {self.prepare_vocab_size}",
        )
        require(
            0.0 < self.prepare_val_fraction < 1.0,
            "prepare_val_fraction",
            f"must lie in (0, 1): the prompts come from the held-out documents, got {self.prepare_val_fraction}",
        )
        require(self.prompt_len >= 2, "prompt_len", f"must be >= 2, got {self.prompt_len}")
        require(self.max_new_tokens >= 2, "max_new_tokens", f"must be >= 2, got {self.max_new_tokens}")
        context = model.max_position_embeddings
        require(
            self.prompt_len + self.max_new_tokens <= context,
            "max_new_tokens",
            f"prompt_len {self.prompt_len} + max_new_tokens {self.max_new_tokens} exceeds the context "
            f"(max_position_embeddings {context})",
        )
        require(bool(self.batch_sizes), "batch_sizes", "needs at least one batch size, e.g. [1, 8]")
        require(
            all(b >= 1 for b in self.batch_sizes), "batch_sizes", f"must all be >= 1, got {self.batch_sizes}"
        )
        require(
            len(set(self.batch_sizes)) == len(self.batch_sizes),
            "batch_sizes",
            f"must not repeat, got {self.batch_sizes}",
        )
        require(self.repeats >= 1, "repeats", f"must be >= 1, got {self.repeats}")
        require(self.cost_repeats >= 1, "cost_repeats", f"must be >= 1, got {self.cost_repeats}")
        require(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        require(self.device in DEVICES, "device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}")
        require(
            self.device != "cuda" or torch.cuda.is_available(),
            "device",
            "cuda asked for, but torch sees no GPU",
        )
        require(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        require(self.threads is None or self.threads >= 1, "threads", f"must be >= 1, got {self.threads}")
        require(bool(self.output), "output", "must be a file path or s3:// URL")
        require(
            self.data_path is None or os.path.isfile(os.path.join(self.data_path, MANIFEST)),
            "data_path",
            f"{self.data_path} is not a prepared token directory (no {MANIFEST}; run moeforge-prepare)",
        )

    def model_config(self) -> ModelConfig:
        values = {**preset_values("model", self.model_name), **self.model_overrides}
        if self.seq_len is not None:
            values["seq_len"] = self.seq_len
        return build_config(ModelConfig, values, "model")

    @property
    def use_cuda(self) -> bool:
        return self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())

    @property
    def cache_root(self) -> str:
        if self.cache_dir:
            return os.path.abspath(self.cache_dir)
        parent = os.path.dirname(self.output) if "://" not in self.output else "runs/bench"
        return os.path.abspath(os.path.join(parent or ".", "generate_cache"))


def _generate_all(model, prompts: list[list[int]], batch: int, cfg: GenerateBenchConfig, mode: str):
    """Every prompt, `batch` at a time (so each batch size decodes the same prompts): (tokens per
    prompt, the calls' GenerationStats summed)."""
    tokens: list[list[int]] = []
    total = GenerationStats()
    for start in range(0, len(prompts), batch):
        result = generate(model, prompts[start : start + batch], cfg.max_new_tokens, speculative=mode)
        tokens += result.tokens
        for f in fields(GenerationStats):  # every field is a count or a time: they add
            setattr(total, f.name, getattr(total, f.name) + getattr(result.stats, f.name))
    return tokens, total


def _timed_pair(model, prompts, batch: int, cfg: GenerateBenchConfig) -> dict[str, tuple[list[float], Any]]:
    """A warm-up pass of each mode, then `repeats` rounds timing plain and speculative in turn (so
    drifting load on a shared machine hits both alike); mode -> (seconds per timed pass over every
    prompt, the last pass's (tokens, stats))."""
    modes = ("none", "mtp")
    results = {m: _generate_all(model, prompts, batch, cfg, m) for m in modes}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(cfg.repeats):
        for m in modes:
            sync(model)
            start = time.perf_counter()
            results[m] = _generate_all(model, prompts, batch, cfg, m)
            sync(model)
            times[m].append(time.perf_counter() - start)
    return {m: (times[m], results[m]) for m in modes}


def _row_steps(stats) -> int:
    """Verify steps summed over rows (generate may batch rows: then `row_steps` counts them)."""
    return int(getattr(stats, "row_steps", stats.steps))


def measure_batch(model, prompts: list[list[int]], batch: int, cfg: GenerateBenchConfig) -> dict:
    """Plain vs speculative greedy on every prompt, `batch` at a time, side by side, and the per-step
    costs behind them."""
    timed = _timed_pair(model, prompts, batch, cfg)
    (plain_times, (plain_tokens, plain_stats)), (spec_times, (spec_tokens, st)) = timed["none"], timed["mtp"]
    plain_s, spec_s = statistics.median(plain_times), statistics.median(spec_times)
    plain_tps = plain_stats.tokens_generated / plain_s
    spec_tps = st.tokens_generated / spec_s
    mismatches = [
        {
            "row": i,
            "first_diff": next((j for j, (a, b) in enumerate(zip(p, s)) if a != b), min(len(p), len(s))),
        }
        for i, (p, s) in enumerate(zip(plain_tokens, spec_tokens))
        if p != s
    ]
    row_steps = _row_steps(st)
    tokens_per_step = st.step_tokens / row_steps if row_steps else 0.0  # per row: 1 + accepted drafts
    costs = step_costs(model, prompts[:batch], cfg.max_new_tokens, cfg.cost_repeats)
    # Forwards saved: a batch steps until its slowest row is done, so this is below tokens_per_step
    # when the rows accept different numbers of drafts.
    step_ratio = plain_stats.steps / st.steps if st.steps else 0.0
    expected = step_ratio * costs["t_decode_ms"] / (costs["t_verify_ms"] + costs["t_draft_ms"])
    return {
        "batch": batch,
        "prompts": len(prompts),
        "plain": {"times_s": plain_times, "median_s": plain_s, "tokens_per_s": plain_tps,
                  "stats": plain_stats.as_dict(), "tokens": plain_tokens},
        "speculative": {"times_s": spec_times, "median_s": spec_s, "tokens_per_s": spec_tps,
                        "stats": st.as_dict(), "tokens": spec_tokens},
        "speedup": spec_tps / plain_tps,
        "acceptance_rate": st.acceptance_rate,
        "accepted_per_step": st.accepted / row_steps if row_steps else 0.0,
        "tokens_per_step": tokens_per_step,
        "step_ratio": step_ratio,
        "verify_rows_per_forward": row_steps / st.steps if st.steps else 0.0,
        "identical": not mismatches,
        # a model stuck repeating itself drafts easily: read the acceptance rate next to this
        "distinct_token_fraction": statistics.fmean(len(set(t)) / len(t) for t in plain_tokens if t),
        "mismatches": mismatches,
        "step_costs": costs,
        "expected_speedup": expected,
    }  # fmt: skip


def run(
    cfg: Mapping[str, Any] | GenerateBenchConfig | None = None, log: Callable[[str], None] = print
) -> dict:
    """Prepare (if needed), train (unless cached), decode side by side per batch size; return the
    report (`run_job` prints its table and writes it as JSON)."""
    if not isinstance(cfg, GenerateBenchConfig):
        cfg = build(GenerateBenchConfig, dict(cfg or {}), "bench.generate")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data_dir, prepared = corpus_dir(cfg, log)
    prompts, offsets, val_tokens = held_out_prompts(cfg, data_dir, max(cfg.batch_sizes))
    model, training = trained_model(cfg, data_dir, log)
    device = torch.device("cuda" if cfg.use_cuda else "cpu")
    model = model.to(device=device, dtype=DTYPES[cfg.dtype]).eval()
    results = []
    for batch in cfg.batch_sizes:
        log(f"[decode] batch {batch}: {cfg.repeats} timed runs per mode after a warm-up")
        results.append(measure_batch(model, prompts, batch, cfg))
    manifest = read_manifest(data_dir)
    host = torch.cuda.get_device_name() if cfg.use_cuda else f"cpu ({os.cpu_count()} CPUs)"
    return {
        "benchmark": "generate",
        "config": asdict(cfg),
        "model": {"name": cfg.model_name, "params": sum(p.numel() for p in model.parameters()),
                  "num_hidden_layers": model.cfg.num_hidden_layers,
                  "mtp_depth": model.cfg.num_nextn_predict_layers, "dtype": cfg.dtype},
        "corpus": {"path": data_dir, "prepared_now": prepared, "files": len(manifest["sources"]),
                   "train_tokens": manifest["splits"]["train"]["num_tokens"], "val_tokens": val_tokens},
        "prompts": {"split": "val", "count": len(prompts), "length": cfg.prompt_len, "offsets": offsets,
                    "note": "moeforge-prepare's val split: documents held out by a seeded hash, never trained on"},
        "training": training,
        "host": {"device": host, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                 "torch": torch.__version__, "python": std_platform.python_version()},
        "v3": {"acceptance_second_token": list(V3_ACCEPTANCE), "speedup": V3_SPEEDUP},
        "results": results,
    }  # fmt: skip


def format_table(report: dict) -> str:
    cfg, tr, m = report["config"], report["training"], report["model"]
    title = (
        f"generate: {m['name']} ({m['params'] / 1e6:.2f}M params, {m['num_hidden_layers']} layers, MTP depth "
        f"{m['mtp_depth']}, {m['dtype']}), {report['host']['device']}, {report['host']['threads']} torch threads"
    )
    how = (
        " -- cached checkpoint reused, not retrained"
        if tr["cached"]
        else f", trained now in {tr['train_s']:.0f}s"
    )
    training = (
        f"training: {tr['steps']} steps, {tr['tokens']:,} tokens, final lm loss {tr['final_lm_loss']:.3f}, "
        f"mtp loss {tr['final_mtp_loss']:.3f} (mean of the last {tr['loss_window']} steps){how}"
    )
    prompts = (
        f"prompts: {report['prompts']['count']} x {cfg['prompt_len']} tokens of the held-out val split; "
        f"{cfg['max_new_tokens']} new tokens per row; median of {cfg['repeats']} runs after a warm-up"
    )
    header = (
        f"{'batch':>5} {'plain tok/s':>11} {'MTP tok/s':>10} {'speedup':>8} {'expected':>8} {'accept':>7} "
        f"{'V3':>7} {'acc/step':>8} {'decode ms':>9} {'verify ms':>9} {'draft ms':>8} {'identical':>9} {'distinct':>8}"
    )
    lines = [title, training, prompts, header]
    v3 = "-".join(f"{100 * a:.0f}" for a in report["v3"]["acceptance_second_token"]) + "%"
    for r in report["results"]:
        c = r["step_costs"]
        lines.append(
            f"{r['batch']:>5} {r['plain']['tokens_per_s']:>11.1f} {r['speculative']['tokens_per_s']:>10.1f} "
            f"{r['speedup']:>7.2f}x {r['expected_speedup']:>7.2f}x {100 * r['acceptance_rate']:>6.1f}% {v3:>7} "
            f"{r['accepted_per_step']:>8.2f} {c['t_decode_ms']:>9.2f} {c['t_verify_ms']:>9.2f} "
            f"{c['t_draft_ms']:>8.2f} {'yes' if r['identical'] else 'NO':>9} "
            f"{100 * r['distinct_token_fraction']:>7.0f}%"
        )
    lines.append(
        "expected = step ratio (plain forwards / MTP forwards; a batch steps until its slowest row is done) "
        "* decode ms / (verify ms + draft ms); ms per step at that batch: "
        f"decode = 1 token, verify = 1 + {m['mtp_depth']} tokens, draft = {m['mtp_depth']} MTP module forward(s)"
    )
    for r in report["results"]:
        if r["batch"] > 1 and r["verify_rows_per_forward"] < 1.5:
            lines.append(
                f"batch {r['batch']}: generate verified the rows one at a time ({r['verify_rows_per_forward']:.1f} "
                "rows per verify forward); expected assumes one batched verify per step"
            )
        for mm in r["mismatches"]:
            lines.append(
                f"batch {r['batch']}: row {mm['row']} differs from plain greedy at token {mm['first_diff']}"
            )
    label = "second-token acceptance" if m["mtp_depth"] == 1 else "acceptance over all depths"
    lines.append(
        f"accept = {label}; DeepSeek-V3: 85-90% of the second token, {report['v3']['speedup']}x tokens/s"
    )
    lines.append(
        "distinct = distinct tokens / tokens of a row's plain output, mean over rows: a model that repeats "
        "itself drafts easily, so a low value flatters accept"
    )
    return "\n".join(lines)


def run_job(values: Mapping[str, Any]) -> str:
    """`moeforge-bench generate`: the composed config -> run (progress printed as it comes), write the
    JSON report; returns the table and where the report went."""
    cfg = build(GenerateBenchConfig, dict(values), "bench.generate")
    report = run(cfg)
    return write_report(cfg.output, report, format_table(report))
