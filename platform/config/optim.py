"""AdamW and the learning-rate schedule."""

from __future__ import annotations

from dataclasses import dataclass

from moeforge.platform.config._build import require


@dataclass
class OptimConfig:
    """V3 defaults: AdamW beta 0.9/0.95, weight decay 0.1, clip 1.0; warmup then cosine or
    constant-then-decay (V3 keeps the LR constant, then decays)."""

    lr: float = 3e-3
    min_lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | constant_decay | constant
    decay_start_fraction: float = 0.8  # constant_decay: fraction of steps before the decay starts

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        require(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        require(0 <= self.min_lr <= self.lr, "min_lr", "must lie in [0, lr]")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "two values in [0, 1)")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables)")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        schedules = ("cosine", "constant_decay", "constant")
        require(self.schedule in schedules, "schedule", f"must be one of {schedules}, got {self.schedule!r}")
        require(0 <= self.decay_start_fraction <= 1, "decay_start_fraction", "must lie in [0, 1]")
