"""The model `moeforge-bench generate` decodes with, and its prompts (for `platform.bench.generate.run`).

corpus_dir        the prepared token directory: `data_path`, or the first `prepare_max_files`
                  stdlib files prepared once into cache_dir by moeforge-prepare's `prepare()`
trained_model     the model trained with the one-process run (Trainer.single(cfg).train()), one
                  checkpoint at the end; its run.dir in cache_dir is named by a hash of everything
                  that decides the weights, so a rerun with the same config loads the checkpoint
held_out_prompts  windows of the val split: documents moeforge-prepare held out, never trained on
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING

from moeforge.platform.config.builder import ConfigError
from moeforge.platform.config.presets import preset_values
from moeforge.platform.config.train import TrainConfig
from moeforge.platform.data.shards import TokenStream, read_manifest

if TYPE_CHECKING:
    from moeforge.platform.bench.generate import GenerateBenchConfig

LOSS_WINDOW = 10  # final losses: mean of the last this many training steps


def corpus_dir(cfg: GenerateBenchConfig, log: Callable[[str], None]) -> tuple[str, bool]:
    """The prepared token directory and whether this run prepared it (moeforge-prepare's own
    `prepare`; a complete output with the same fingerprint is reused by prepare itself)."""
    if cfg.data_path is not None:
        return os.path.abspath(cfg.data_path), False
    from moeforge.platform.data.prepare import PrepareConfig, prepare

    name = f"tokens-stdlib-{cfg.prepare_max_files}f-{cfg.prepare_vocab_size}v-{cfg.prepare_val_fraction}val-s{cfg.seed}"
    out = os.path.join(cfg.cache_root, name)
    prepare_cfg = PrepareConfig(
        output=out,
        max_files=cfg.prepare_max_files,
        vocab_size=cfg.prepare_vocab_size,
        val_fraction=cfg.prepare_val_fraction,
        seed=cfg.seed,
    )
    result = prepare(prepare_cfg, log=log)  # a complete output of the same inputs and layout: a no-op
    return out, not result.already_complete


def train_config(cfg: GenerateBenchConfig, data_dir: str, run_dir: str) -> TrainConfig:
    """The training run: the shipped presets, one checkpoint at the end, evaluation at the end."""
    parallel = preset_values("parallel", "single")
    data = {"source": "tokens", "path": data_dir, "global_batch": cfg.global_batch, "seed": cfg.seed}
    return TrainConfig.from_dict(
        {
            "model": cfg.model_config().to_dict(),
            "run": {"name": "bench-generate", "dir": run_dir, "seed": cfg.seed, "steps": cfg.train_steps,
                    "log_every": cfg.log_every, "eval_every": cfg.train_steps, "eval_batches": 2},
            "parallel": parallel,
            "resources": {"gpus_per_worker": 1.0 if cfg.use_cuda else 0.0},
            "precision": preset_values("precision", cfg.precision_name),
            "data": data,
            "optim": preset_values("optim", "adamw"),
            "checkpoint": {"every": cfg.train_steps, "keep": 1, "resume": False},
        }
    )  # fmt: skip


def cache_key(train_cfg: TrainConfig, data_dir: str) -> str:
    """What decides the trained weights: the model, the training recipe, the data (by fingerprint)."""
    manifest = read_manifest(data_dir)
    spec = {
        "model": train_cfg.model.to_dict(),
        "steps": train_cfg.run.steps,
        "seed": train_cfg.run.seed,
        "data": {"fingerprint": manifest.get("fingerprint"), "global_batch": train_cfg.data.global_batch},
        "precision": asdict(train_cfg.precision),
        "optim": asdict(train_cfg.optim),
        "device": train_cfg.resources.gpus_per_worker > 0,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def trained_model(cfg: GenerateBenchConfig, data_dir: str, log: Callable[[str], None]):
    """(model, training record): the cached checkpoint of this config, or a fresh training run."""
    from moeforge.platform.checkpoint.reshard import load_model_from_checkpoint
    from moeforge.platform.checkpoint.store import latest_checkpoint, read_meta

    probe = train_config(cfg, data_dir, "unused")
    run_dir = os.path.join(
        cfg.cache_root, f"{cfg.model_name}-{cfg.train_steps}steps-{cache_key(probe, data_dir)}"
    )
    train_cfg = train_config(cfg, data_dir, run_dir)
    latest = latest_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    cached = latest is not None and read_meta(latest).step == cfg.train_steps
    if not cached:
        from moeforge.platform.train.trainer import Trainer

        shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run: start it afresh
        Trainer.single(train_cfg, log=lambda line: log(f"[train] {line}")).train()
        latest = latest_checkpoint(run_dir)
    else:
        log(f"[train] reusing the cached checkpoint {latest} (same config; delete {run_dir} to retrain)")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    tail = records[-LOSS_WINDOW:]
    summary_path = os.path.join(run_dir, "summary.json")
    summary = {}
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
    record = {
        "cached": cached,
        "run_dir": run_dir,
        "checkpoint": latest,
        "steps": len(records),
        "tokens": sum(int(r["tokens"]) for r in records),
        "seq_len": train_cfg.model.seq_len,
        "first_lm_loss": records[0]["lm_loss"],
        "loss_window": len(tail),
        "final_lm_loss": statistics.fmean(r["lm_loss"] for r in tail),
        "final_mtp_loss": statistics.fmean(r["mtp_loss"] for r in tail),
        "eval_loss": summary.get("eval_loss"),
        "train_s": sum(r["step_time_s"] for r in records),
    }
    return load_model_from_checkpoint(latest), record


def held_out_prompts(
    cfg: GenerateBenchConfig, data_dir: str, count: int
) -> tuple[list[list[int]], list[int], int]:
    """`count` windows of prompt_len tokens of the val split, spread evenly and not overlapping (a
    window may cross a document boundary, end-of-text token included); (prompts, offsets, val tokens)."""
    length = cfg.prompt_len
    val = TokenStream.from_prepared(data_dir, "val", hash_check=False)
    if val.num_tokens < count * length:
        where = "data_path" if cfg.data_path is not None else "prepare_max_files"
        raise ConfigError(
            f"{where}: the val split of {data_dir} holds {val.num_tokens} tokens, too few for {count} "
            f"prompts of prompt_len {length} (prepare more files, or hold out more: prepare_val_fraction)"
        )
    stride = (val.num_tokens - length) // max(count - 1, 1)
    offsets = [i * stride for i in range(count)]
    return [[int(t) for t in val.read(o, length)] for o in offsets], offsets, val.num_tokens
