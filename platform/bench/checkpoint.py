"""Checkpoint cost (`moeforge-bench checkpoint`): how much step time does a checkpoint take, written
synchronously or asynchronously?

Trains the same model, init and data once per mode with the single-process loop
(`Trainer.single(cfg).train()`), checkpointing every `every` steps into its own run.dir:

    none    checkpoint.every=0: the baseline step time
    sync    checkpoint.async=false: the step waits while the state is serialized, hashed, written
            (uploaded) and committed
    async   checkpoint.async=true: the step waits only for the host-memory snapshot (and for the
            previous checkpoint, if it is still being written); the write runs on a background
            thread (`platform.checkpoint.async_writer.AsyncCheckpointWriter`), competing with training
            for CPU cores and memory bandwidth, which shows in the steps after a checkpoint

Per step the loop records `step_time_s` in run.dir/metrics.jsonl (data, forward, backward, update).
The loop checkpoints after it has recorded the step, so the bench also times each
`save_checkpoint` call (the time the training thread was blocked by it), and a checkpoint step's
time is step_time_s plus that. The figures per mode, over the steps after the first `warmup`:

    ckpt step     mean time of the steps that checkpoint
    other step    mean time of the other steps
    ckpt cost     ckpt step - other step: the checkpoint's cost on the critical path
    after ckpt    mean time of the step right after a checkpoint (async: the write runs beside it)
    blocked       mean time save_checkpoint held the training thread
    write         mean time to write one checkpoint (sync: = blocked; async: the background thread's)
    per ckpt      (total step time - the baseline's over the same steps) / checkpoints: everything
                  checkpointing cost, contention included (needs mode none)

Checkpoint bytes are those of the newest complete checkpoint (meta.json), and each mode's
checkpoints are checked to be complete and readable. Timings are measured, never asserted. Prints a
table, writes JSON (`platform.bench.report.write_report`).
"""

from __future__ import annotations

import json
import os
import platform as std_platform
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from moeforge.platform.bench.report import write_report
from moeforge.platform.checkpoint.async_writer import AsyncCheckpointWriter
from moeforge.platform.checkpoint.store import latest_checkpoint, list_checkpoints, read_meta
from moeforge.platform.config.builder import ConfigError, build, require
from moeforge.platform.config.cadence import Cadence
from moeforge.platform.config.presets import preset_exists, preset_values
from moeforge.platform.config.train import TrainConfig
from moeforge.platform.outputs.storage import is_s3, open_storage

MODES = ("none", "sync", "async")
DEVICES = ("auto", "cpu", "cuda")
MB = 1e6


@dataclass
class CheckpointBenchConfig:
    """conf/bench_checkpoint.yaml (every value documented there)."""

    # (not `model`/`precision`/`data`: Hydra would read those overrides as its config groups)
    model_name: str = "small"  # conf/model/<model_name>.yaml
    seq_len: int | None = None  # None: the model config's
    model_overrides: dict[str, Any] = field(default_factory=dict)  # model fields over the preset's
    global_batch: int = 1
    steps: int = 20
    every: int = 5  # checkpoint.every of the sync and async runs
    keep: int = 2  # checkpoint.keep
    warmup: int = 1  # first steps left out of every mean (allocator, autotuning, first touch)
    prime_steps: int = 2  # an untimed run of this many steps before the measured ones (0: none)
    modes: list[str] = field(default_factory=lambda: list(MODES))
    precision_name: str = "bf16"  # conf/precision/<name>.yaml
    data_name: str = "synthetic"  # conf/data/<name>.yaml
    device: str = "auto"  # auto: the GPU when torch sees one
    seed: int = 1234
    log_every: int = 5
    threads: int | None = None  # torch intra-op threads; None leaves torch's default
    run_dir: str | None = None  # each mode's run.dir is run_dir/<mode> (local or s3://); None: a temp dir
    output: str = "runs/bench/checkpoint.json"  # local path or s3:// URL

    def __post_init__(self) -> None:
        self.modes = list(self.modes)
        require(
            preset_exists("model", self.model_name), "model_name", f"no conf/model/{self.model_name}.yaml"
        )
        require(
            preset_exists("precision", self.precision_name),
            "precision_name",
            f"no conf/precision/{self.precision_name}.yaml",
        )
        require(preset_exists("data", self.data_name), "data_name", f"no conf/data/{self.data_name}.yaml")
        require(
            self.seq_len is None or self.seq_len >= 1, "seq_len", f"must be >= 1 or null, got {self.seq_len}"
        )
        require(self.global_batch >= 1, "global_batch", f"must be >= 1, got {self.global_batch}")
        require(self.steps >= 2, "steps", f"must be >= 2, got {self.steps}")
        require(
            self.every >= 2,
            "every",
            f"must be >= 2 (steps without a checkpoint are the reference), got {self.every}",
        )
        require(self.keep >= 1, "keep", f"must be >= 1, got {self.keep}")
        require(0 <= self.warmup, "warmup", f"must be >= 0, got {self.warmup}")
        require(0 <= self.prime_steps, "prime_steps", f"must be >= 0, got {self.prime_steps}")
        cadence = Cadence(self.steps, checkpoint_every=self.every)
        measured = range(self.warmup + 1, self.steps + 1)
        require(
            any(cadence.checkpoints(s) for s in measured)
            and any(not cadence.checkpoints(s) for s in measured),
            "warmup",
            f"leaves no checkpoint step or no other step to measure (steps={self.steps}, every={self.every}, "
            f"warmup={self.warmup})",
        )
        unknown = [m for m in self.modes if m not in MODES]
        require(
            not unknown,
            "modes",
            f"unknown mode {unknown[0] if unknown else ''!r} (known: {', '.join(MODES)})",
        )
        require(len(set(self.modes)) == len(self.modes), "modes", f"must not repeat a mode, got {self.modes}")
        require(
            any(m != "none" for m in self.modes), "modes", "needs sync and/or async (none is the baseline)"
        )
        require(self.device in DEVICES, "device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}")
        require(
            self.device != "cuda" or torch.cuda.is_available(),
            "device",
            "cuda asked for, but torch sees no GPU",
        )
        require(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        require(self.threads is None or self.threads >= 1, "threads", f"must be >= 1, got {self.threads}")
        require(bool(self.output), "output", "must be a file path or s3:// URL")

    @property
    def use_cuda(self) -> bool:
        return self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())


def train_config(
    cfg: CheckpointBenchConfig, mode: str, run_dir: str, steps: int | None = None
) -> TrainConfig:
    """One mode's run: the shipped presets, no evaluation, no tracker, a fresh run.dir. Mode "prime"
    is the untimed warm-up run (`steps` of them, no checkpoints)."""
    model = {**preset_values("model", cfg.model_name), **cfg.model_overrides}
    if cfg.seq_len is not None:
        model["seq_len"] = cfg.seq_len
    data = preset_values("data", cfg.data_name)
    data.update(seed=cfg.seed, global_batch=cfg.global_batch)  # the YAML's ${run.seed} is Hydra's
    parallel = preset_values("parallel", "single")
    return TrainConfig.from_dict(
        {
            "model": model,
            "run": {
                "name": f"bench-checkpoint-{mode}",
                "dir": run_dir,
                "seed": cfg.seed,
                "steps": steps or cfg.steps,
                "log_every": cfg.log_every,
                "eval_every": 0,
            },
            "parallel": parallel,
            "resources": {"gpus_per_worker": 1.0 if cfg.use_cuda else 0.0},
            "precision": preset_values("precision", cfg.precision_name),
            "data": data,
            "optim": preset_values("optim", "adamw"),
            "checkpoint": {
                "every": cfg.every if mode in ("sync", "async") else 0,
                "keep": cfg.keep,
                "resume": False,
                "async": mode == "async",
                "async_failure": "fail",
            },
        }
    )


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _read_metrics(run_dir: str) -> list[dict]:
    text = open_storage(run_dir).read_text("metrics.jsonl")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _train(cfg: CheckpointBenchConfig, mode: str, train_cfg: TrainConfig, log: Callable[[str], None]) -> dict:
    """Train one mode; return its per-step times, save timings and checkpoint facts."""
    from moeforge.platform.train.trainer import Trainer

    run_dir = train_cfg.run.dir
    trainer = Trainer.single(train_cfg, log=lambda line: log(f"[{mode}] {line}"))
    engine = trainer.engine
    blocked: dict[int, float] = {}  # step -> seconds save_checkpoint held the training thread
    writers: list[AsyncCheckpointWriter] = []
    inner = engine.save_checkpoint

    def timed_save(*args: Any, **kwargs: Any) -> str:
        # A timing wrapper around the engine's own save (the Trainer calls engine.save_checkpoint()).
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            blocked[engine.step] = time.perf_counter() - started
            for value in vars(engine).values():  # the loop's writer, whatever it names it
                if isinstance(value, AsyncCheckpointWriter) and all(value is not w for w in writers):
                    writers.append(value)

    engine.save_checkpoint = timed_save
    started = time.perf_counter()
    summary = trainer.train()
    train_s = time.perf_counter() - started
    for value in vars(engine).values():  # a writer made after the last save, or kept to the end
        if isinstance(value, AsyncCheckpointWriter) and all(value is not w for w in writers):
            writers.append(value)

    records = _read_metrics(run_dir)
    cadence = Cadence.of(train_cfg)
    steps = []
    for r in records:
        s = int(r["step"])
        save_s = blocked.get(s, 0.0)
        steps.append(
            {
                "step": s,
                "step_time_s": r["step_time_s"],
                "save_s": save_s,
                "time_s": r["step_time_s"] + save_s,
                "checkpoints": cadence.checkpoints(s),
            }
        )
    history = [asdict(rec) for w in writers for rec in w.history]
    complete = list_checkpoints(run_dir)
    latest = latest_checkpoint(run_dir)
    meta = read_meta(latest) if latest else None
    return {
        "mode": mode,
        "run_dir": run_dir,
        "steps": steps,
        "train_s": train_s,
        "final_loss": summary.final_loss,
        "async_writer_used": bool(writers),
        "writer_history": history,  # async: per checkpoint snapshot_s / wait_s / write_s / bytes
        "checkpoints": [s for s, _ in complete],  # complete ones left after pruning (keep)
        "checkpoint_steps": [s["step"] for s in steps if s["checkpoints"]] if mode != "none" else [],
        "latest": latest,
        "latest_step": meta.step if meta else None,
        "checkpoint_bytes": sum(int(e["bytes"]) for e in meta.shards.values()) if meta else None,
    }


def summarize(run: dict, cfg: CheckpointBenchConfig, baseline: dict | None) -> dict:
    """The table's figures for one mode (see the module docstring)."""
    measured = [s for s in run["steps"] if s["step"] > cfg.warmup]
    ckpt_steps = {s["step"] for s in measured if s["checkpoints"]} if run["mode"] != "none" else set()
    ckpt = [s["time_s"] for s in measured if s["step"] in ckpt_steps]
    after = [s["time_s"] for s in measured if s["step"] - 1 in ckpt_steps and s["step"] not in ckpt_steps]
    other = [s["time_s"] for s in measured if s["step"] not in ckpt_steps]
    blocked = [s["save_s"] for s in run["steps"] if s["step"] in ckpt_steps]
    if run["mode"] == "async" and run["async_writer_used"]:
        writes = [h["write_s"] for h in run["writer_history"] if h["write_s"] is not None]
        snapshots = [h["snapshot_s"] for h in run["writer_history"]]
        waits = [h["wait_s"] for h in run["writer_history"]]
    else:  # synchronous: the whole write is the blocked time
        writes = [s["save_s"] for s in run["steps"] if s["checkpoints"]] if run["mode"] != "none" else []
        snapshots, waits = [], []
    per_ckpt = None
    if baseline is not None and run["mode"] != "none" and ckpt_steps:
        base = {s["step"]: s["time_s"] for s in baseline["steps"]}
        if all(s["step"] in base for s in measured):
            per_ckpt = (sum(s["time_s"] for s in measured) - sum(base[s["step"]] for s in measured)) / len(
                ckpt_steps
            )
    mean_ckpt, mean_other, mean_after = _mean(ckpt), _mean(other), _mean(after)
    write_s = _mean(writes)
    nbytes = run["checkpoint_bytes"]
    return {
        "mode": run["mode"],
        "ckpt_step_s": mean_ckpt,
        "other_step_s": mean_other,
        "ckpt_cost_s": _diff(mean_ckpt, mean_other),
        "after_ckpt_step_s": mean_after,
        "after_ckpt_cost_s": _diff(mean_after, mean_other),
        "blocked_s": _mean(blocked),
        "snapshot_s": _mean(snapshots),
        "wait_prev_s": _mean(waits),
        "write_s": write_s,
        "checkpoint_bytes": nbytes,
        "write_mb_per_s": nbytes / MB / write_s if nbytes and write_s else None,
        "per_ckpt_vs_none_s": per_ckpt,
        "measured_checkpoints": len(ckpt_steps),
        "train_s": run["train_s"],
        "complete": run["mode"] == "none" or run["latest_step"] == cfg.steps,
        "async_effective": run["async_writer_used"] if run["mode"] == "async" else None,
    }


def run(
    cfg: Mapping[str, Any] | CheckpointBenchConfig | None = None, log: Callable[[str], None] = print
) -> dict:
    """Train once per mode (progress lines to `log`); return the report (`run_job` prints its table
    and writes it as JSON)."""
    if not isinstance(cfg, CheckpointBenchConfig):
        cfg = build(CheckpointBenchConfig, dict(cfg or {}), "bench.checkpoint")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory(prefix="moeforge-bench-checkpoint-") as tmp:
        root = (cfg.run_dir or tmp).rstrip("/")
        if not is_s3(root):
            root = os.path.abspath(root)
        # Every mode's config is built (validated) before the first trains, so a bad value fails at once.
        configs = {mode: train_config(cfg, mode, f"{root}/{mode}") for mode in cfg.modes}
        for train_cfg in configs.values():
            if train_cfg.checkpoint.every and list_checkpoints(train_cfg.run.dir):
                raise ConfigError(
                    f"run_dir: {train_cfg.run.dir} holds checkpoints of an earlier run; use another run_dir"
                )
        if cfg.prime_steps:  # the first run in a process pays one-off costs; no mode should
            from moeforge.platform.train.trainer import Trainer

            prime = train_config(cfg, "prime", f"{root}/prime", steps=cfg.prime_steps)
            Trainer.single(prime, log=lambda line: log(f"[prime, untimed] {line}")).train()
        runs = [_train(cfg, mode, configs[mode], log) for mode in cfg.modes]
    baseline = next((r for r in runs if r["mode"] == "none"), None)
    train_cfg = configs[cfg.modes[0]]
    device = torch.cuda.get_device_name() if cfg.use_cuda else f"cpu ({os.cpu_count()} CPUs)"
    report = {
        "benchmark": "checkpoint",
        "config": asdict(cfg),
        "seq_len": train_cfg.model.seq_len,
        "tokens_per_step": cfg.global_batch * train_cfg.model.seq_len,
        "storage": "s3" if is_s3(root) else "local",
        "host": {
            "device": device,
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": std_platform.python_version(),
        },
        "runs": runs,
        "summary": [summarize(r, cfg, baseline) for r in runs],
    }
    return report


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _signed(x: float | None) -> str:
    return "-" if x is None else f"{x:+.3f}"


def format_table(report: dict) -> str:
    cfg = report["config"]
    title = (
        f"checkpoint: {cfg['model_name']}, {cfg['steps']} steps x {cfg['global_batch']} seq x {report['seq_len']} tok, "
        f"checkpoint every {cfg['every']} (keep {cfg['keep']}), {report['host']['device']}, "
        f"{report['host']['threads']} torch threads, {report['storage']} run.dir; first {cfg['warmup']} step(s) "
        "left out; seconds"
    )
    header = (
        f"{'mode':<6} {'ckpt step':>9} {'other':>7} {'ckpt cost':>9} {'after':>7} {'after cost':>10} "
        f"{'blocked':>8} {'write':>7} {'MB':>8} {'MB/s':>7} {'per ckpt':>9} {'complete':>8}"
    )
    lines = [title, header]
    for row in report["summary"]:
        mb = "-" if row["checkpoint_bytes"] is None else f"{row['checkpoint_bytes'] / MB:.1f}"
        rate = "-" if row["write_mb_per_s"] is None else f"{row['write_mb_per_s']:.0f}"
        complete = "yes" if row["complete"] else "NO"
        lines.append(
            f"{row['mode']:<6} {_s(row['ckpt_step_s']):>9} {_s(row['other_step_s']):>7} "
            f"{_signed(row['ckpt_cost_s']):>9} {_s(row['after_ckpt_step_s']):>7} {_signed(row['after_ckpt_cost_s']):>10} "
            f"{_s(row['blocked_s']):>8} {_s(row['write_s']):>7} {mb:>8} {rate:>7} "
            f"{_signed(row['per_ckpt_vs_none_s']):>9} {complete:>8}"
        )
    for row in report["summary"]:
        if row["mode"] == "async" and not row["async_effective"]:
            lines.append("note: async run: the loop used no AsyncCheckpointWriter, so it wrote synchronously")
        elif row["mode"] == "async":
            lines.append(
                f"async: blocked = snapshot {_s(row['snapshot_s'])} s, of which waiting for the previous "
                f"checkpoint {_s(row['wait_prev_s'])} s"
            )
    lines.append(
        "ckpt cost = ckpt step - other; after = the step after a checkpoint; per ckpt = extra step time vs the "
        "none run / checkpoints"
    )
    return "\n".join(lines)


def run_job(values: Mapping[str, Any]) -> str:
    """`moeforge-bench checkpoint`: the composed config -> run (progress printed as it comes), write the
    JSON report; returns the table and where the report went."""
    cfg = build(CheckpointBenchConfig, dict(values), "bench.checkpoint")
    report = run(cfg)
    return write_report(cfg.output, report, format_table(report))
