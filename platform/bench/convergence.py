"""FP8 vs BF16 convergence (`moeforge-bench convergence`): does the FP8 recipe track BF16 training?

Trains one model (`conf/model/<model>.yaml`, tiny by default) once per precision policy
(`conf/precision/<name>.yaml`: bf16, then fp8) and per seed with the reference loop. Within a seed
every precision gets the same init, the same data and the same LR schedule; the seeds differ in
both. Each run's final training loss is the mean of the last `window` steps' losses (one step's loss
is noisy), compared as a relative difference against the first precision of the same seed:
(loss_fp8 - loss_bf16) / loss_bf16. One seed's difference is itself noise of the size being measured,
so the report gives, per precision, the difference of every seed and across seeds their mean, min,
max and sample standard deviation, and whether |mean| and max |difference| are within BOUND (0.25%).
DeepSeek-V3 reports a relative loss error below 0.25% for its FP8 recipe against BF16 (on far larger
models and runs); the figure here is the same measure at toy scale. The held-out loss at the end is
compared the same way when the data has a validation split.

On CPU the FP8 GEMMs run through the torch twins of the Triton kernels (same quantization and block
scaling), so the numbers measure the recipe's numerics, not its speed. Prints a table, writes JSON.
"""

from __future__ import annotations

import json
import math
import os
import platform as std_platform
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from moeforge.platform.config.builder import build, require
from moeforge.platform.config.presets import preset_exists, preset_values
from moeforge.platform.config.train import TrainConfig
from moeforge.platform.outputs.storage import write_text_file


@dataclass
class ConvergenceBenchConfig:
    """conf/bench_convergence.yaml. The first precision is the baseline the others are compared to."""

    model: str = "tiny"  # conf/model/<model>.yaml
    precisions: list[str] = field(default_factory=lambda: ["bf16", "fp8"])  # conf/precision/<name>.yaml
    steps: int = 300
    window: int = 20  # final loss = mean of the last `window` steps' training losses
    seeds: list[int] = field(default_factory=lambda: [1234, 1235, 1236])  # model init and data, per seed
    global_batch: int = 8
    seq_len: int | None = None  # None: the model config's
    data: str = "synthetic"  # conf/data/<data>.yaml
    data_path: str | None = None  # for data=tokens
    eval_batches: int = 4  # held-out batches at the end (when the data has a validation split)
    log_every: int = 50
    threads: int | None = None  # torch intra-op threads; None leaves torch's default
    run_dir: str | None = None  # each run's records go to run_dir/<seed>/<precision>; None: a temp dir
    output: str = "runs/bench/convergence.json"  # local path or s3:// URL

    def __post_init__(self) -> None:
        self.precisions = list(self.precisions)
        self.seeds = list(self.seeds)
        require(len(self.seeds) >= 1, "seeds", "needs at least one seed, e.g. [1234, 1235, 1236]")
        require(len(set(self.seeds)) == len(self.seeds), "seeds", f"must not repeat a seed, got {self.seeds}")
        require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        require(1 <= self.window <= self.steps, "window", f"must lie in [1, steps={self.steps}], got {self.window}")
        require(len(self.precisions) >= 2, "precisions", "needs a baseline and at least one other, e.g. [bf16, fp8]")
        require(len(set(self.precisions)) == len(self.precisions), "precisions", "must not repeat a name")
        for name in self.precisions:
            require(preset_exists("precision", name), "precisions", f"no conf/precision/{name}.yaml")
        require(preset_exists("model", self.model), "model", f"no conf/model/{self.model}.yaml")
        require(preset_exists("data", self.data), "data", f"no conf/data/{self.data}.yaml")
        require(self.threads is None or self.threads >= 1, "threads", "must be >= 1")


def model_values(cfg: ConvergenceBenchConfig) -> dict:
    """conf/model/<cfg.model>.yaml with the benchmark's seq_len."""
    model = preset_values("model", cfg.model)
    if cfg.seq_len is not None:
        model["seq_len"] = cfg.seq_len
    return model


BOUND = 0.0025  # DeepSeek-V3: FP8 vs BF16 relative loss error below 0.25%


def train_config(cfg: ConvergenceBenchConfig, precision: str, run_dir: str, seed: int) -> TrainConfig:
    """The run of one precision and seed: the shipped model, data and optimizer configs, no
    checkpoints, no tracker, evaluation only at the end."""
    data = preset_values("data", cfg.data)
    data.update(seed=seed, global_batch=cfg.global_batch)  # the YAML's ${run.seed} is Hydra's
    if cfg.data_path is not None:
        data["path"] = cfg.data_path
    return TrainConfig.from_dict(
        {
            "model": model_values(cfg),
            "run": {"name": f"convergence-{precision}-{seed}", "dir": run_dir, "seed": seed, "steps": cfg.steps,
                    "log_every": cfg.log_every, "eval_every": cfg.steps, "eval_batches": cfg.eval_batches},
            "precision": preset_values("precision", precision),
            "data": data,
            "optim": preset_values("optim", "adamw"),
            "checkpoint": {"every": 0, "resume": False},
        }
    )


def _train(
    cfg: ConvergenceBenchConfig, precision: str, seed: int, train_cfg: TrainConfig, log: Callable[[str], None]
) -> dict:
    from moeforge.platform.train.trainer import Trainer

    trainer = Trainer.single(train_cfg, log=lambda line: log(f"[seed {seed} {precision}] {line}"))
    summary = trainer.train()
    losses = summary.losses
    return {
        "seed": seed,
        "precision": precision,
        "first_loss": losses[0],
        "final_loss": sum(losses[-cfg.window :]) / cfg.window,
        "eval_loss": summary.eval_loss,
        "seconds": summary.elapsed_s,
        "tokens_per_s": summary.tokens_per_s,
        "losses": losses,
    }


def _relative(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None else (value - base) / base


def spread(values: list[float | None], bound: float = BOUND) -> dict:
    """Per-seed relative differences -> their mean, min, max, sample std (None for one seed), max
    |difference|, and whether |mean| and max |difference| are within `bound`. All None when any
    seed has no value (no validation split)."""
    n = len(values)
    if n == 0 or any(v is None for v in values):
        return {"per_seed": values, "n": n, "mean": None, "min": None, "max": None, "std": None,
                "max_abs": None, "mean_within_bound": None, "max_within_bound": None}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    max_abs = max(abs(v) for v in values)
    return {"per_seed": values, "n": n, "mean": mean, "min": min(values), "max": max(values), "std": std,
            "max_abs": max_abs, "mean_within_bound": abs(mean) <= bound, "max_within_bound": max_abs <= bound}


def summarize(runs: list[dict], precisions: list[str], seeds: list[int]) -> list[dict]:
    """One row per non-baseline precision: spread() of its final and eval loss differences over seeds."""
    rows = []
    for precision in precisions[1:]:
        mine = {r["seed"]: r for r in runs if r["precision"] == precision}
        final = spread([mine[seed]["final_loss_rel_diff"] for seed in seeds])
        rows.append({
            "precision": precision,
            "seeds": list(seeds),
            "final_loss_rel_diff": final,
            "eval_loss_rel_diff": spread([mine[seed]["eval_loss_rel_diff"] for seed in seeds]),
            "within_bound": bool(final["mean_within_bound"] and final["max_within_bound"]),
        })
    return rows


def run(cfg: Mapping[str, Any] | ConvergenceBenchConfig | None = None, log: Callable[[str], None] = print) -> dict:
    """Train once per seed and precision, print the table, write JSON to cfg.output; return the report."""
    if not isinstance(cfg, ConvergenceBenchConfig):
        cfg = build(ConvergenceBenchConfig, dict(cfg or {}), "bench.convergence")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    runs = []
    with tempfile.TemporaryDirectory(prefix="moeforge-convergence-") as tmp:
        root = (cfg.run_dir or tmp).rstrip("/")
        # Every run's config is built (and validated) before the first one trains: a bad value fails
        # at once, and every seed reads the same presets even if conf/ changes during a long run.
        configs = {
            (seed, precision): train_config(cfg, precision, f"{root}/{seed}/{precision}", seed)
            for seed in cfg.seeds
            for precision in cfg.precisions
        }
        for seed in cfg.seeds:
            mine = [_train(cfg, precision, seed, configs[seed, precision], log) for precision in cfg.precisions]
            base = mine[0]  # the same seed's baseline: same init, same data
            for r in mine:
                r["final_loss_rel_diff"] = _relative(r["final_loss"], base["final_loss"])
                r["eval_loss_rel_diff"] = _relative(r["eval_loss"], base["eval_loss"])
            runs += mine
    seq_len = model_values(cfg)["seq_len"]
    report = {
        "benchmark": "convergence",
        "config": asdict(cfg),
        "baseline": cfg.precisions[0],
        "seeds": list(cfg.seeds),
        "bound": BOUND,
        "seq_len": seq_len,
        "tokens_per_step": cfg.global_batch * seq_len,
        "host": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                 "python": std_platform.python_version()},
        "runs": runs,  # seed-major: every precision of the first seed, then the next seed
        "summary": summarize(runs, cfg.precisions, cfg.seeds),
        "seconds": sum(r["seconds"] for r in runs),
    }
    log(format_table(report))
    write_text_file(cfg.output, json.dumps(report, indent=1) + "\n")  # local path or s3://
    log(f"wrote {cfg.output}")
    return report


def _pct(x: float | None, sign: bool = True) -> str:
    return "-" if x is None else f"{100 * x:+.3f}%" if sign else f"{100 * x:.3f}%"


def _yes_no(flag: bool | None) -> str:
    return "-" if flag is None else "yes" if flag else "NO"


def format_table(report: dict) -> str:
    cfg, base, seeds = report["config"], report["baseline"], report["seeds"]
    title = (
        f"convergence: {cfg['model']}, {cfg['steps']} steps x {cfg['global_batch']} seq x {report['seq_len']} "
        f"tok, seeds {', '.join(map(str, seeds))}; final loss = mean of the last {cfg['window']} steps"
    )
    header = (
        f"{'seed':>6} {'precision':<10} {'first loss':>10} {'final loss':>10} {'vs ' + base:>10} "
        f"{'eval loss':>10} {'vs ' + base:>10} {'tok/s':>8} {'time':>8}"
    )
    lines = [title, header]
    for r in report["runs"]:
        eval_loss = "-" if r["eval_loss"] is None else f"{r['eval_loss']:.4f}"
        lines.append(
            f"{r['seed']:>6} {r['precision']:<10} {r['first_loss']:>10.4f} {r['final_loss']:>10.4f} "
            f"{_pct(r['final_loss_rel_diff']):>10} {eval_loss:>10} {_pct(r['eval_loss_rel_diff']):>10} "
            f"{r['tokens_per_s']:>8,.0f} {r['seconds']:>7.0f}s"
        )
    bound = _pct(report["bound"], sign=False)
    lines += [
        "",
        f"relative difference vs {base} over {len(seeds)} seed(s) (std: sample standard deviation)",
        (
            f"{'precision':<10} {'loss':<6} {'mean':>9} {'std':>9} {'min':>9} {'max':>9} {'max |d|':>9} "
            f"{'|mean|<=' + bound:>14} {'max|d|<=' + bound:>14}"
        ),
    ]
    for row in report["summary"]:
        for loss in ("final", "eval"):
            s = row[f"{loss}_loss_rel_diff"]
            lines.append(
                f"{row['precision']:<10} {loss:<6} {_pct(s['mean']):>9} {_pct(s['std'], sign=False):>9} "
                f"{_pct(s['min']):>9} {_pct(s['max']):>9} {_pct(s['max_abs'], sign=False):>9} "
                f"{_yes_no(s['mean_within_bound']):>14} {_yes_no(s['max_within_bound']):>14}"
            )
    lines.append(f"total time {report['seconds']:.0f}s")
    lines.append("(DeepSeek-V3 reports FP8 vs BF16 relative loss error < 0.25% at scale)")
    return "\n".join(lines)


def run_job(values: Mapping[str, Any]) -> str:
    """`moeforge-bench convergence`: the composed config -> run (table and progress printed as they
    come); returns the closing line."""
    report = run(values)
    parts = []
    for row in report["summary"]:
        s = row["final_loss_rel_diff"]
        std = "" if s["std"] is None else f", std {_pct(s['std'], sign=False)}"
        parts.append(
            f"{row['precision']} vs {report['baseline']}: final loss mean {_pct(s['mean'])} over {s['n']} seed(s) "
            f"(min {_pct(s['min'])}, max {_pct(s['max'])}{std}); within {_pct(report['bound'], sign=False)}: "
            f"{_yes_no(row['within_bound'])}"
        )
    return "; ".join(parts)
