"""Learning-rate schedule: a pure function of (step, OptimConfig, total_steps).

Every rank of a pipeline run and the single-process reference loop call `lr_at` with the same
arguments, so they agree on the LR without sharing any scheduler state (nothing to checkpoint).

Shapes of the schedules (steps are 0-based; step s is the s-th optimizer step):
- warmup (all schedules): lr * (s + 1) / warmup_steps for s < warmup_steps, so step 0 already moves
  the weights and step warmup_steps - 1 reaches the peak.
- `cosine`: cosine from lr (first step after warmup) down to min_lr, reached exactly on the last step.
- `constant_decay` (the V3 shape): lr held until decay_start_fraction * total_steps (or the end of
  warmup if later), then a cosine down to min_lr on the last step.
- `constant`: lr after warmup.
"""

from __future__ import annotations

import math

from moeforge.platform.config.optim import OptimConfig


def _cosine(lr: float, min_lr: float, progress: float) -> float:
    """lr at progress 0, min_lr at progress 1, half a cosine in between."""
    progress = min(max(progress, 0.0), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, optim_cfg: OptimConfig, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based) in a run of `total_steps` steps."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    cfg = optim_cfg
    warmup = cfg.warmup_steps
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    last = total_steps - 1
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        decay_start = warmup
    elif cfg.schedule == "constant_decay":
        decay_start = max(warmup, int(cfg.decay_start_fraction * total_steps))
    else:  # OptimConfig validates the name; this guards a hand-built config
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    if step <= decay_start:
        return cfg.lr
    # The decay spans decay_start .. last, so the last step lands on min_lr exactly.
    return _cosine(cfg.lr, cfg.min_lr, (step - decay_start) / max(1, last - decay_start))


def set_lr(optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group (both decay groups share one LR)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
