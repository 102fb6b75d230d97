"""AdamW, the learning-rate schedule and the recipe's other step-dependent values."""

from __future__ import annotations

from dataclasses import dataclass, field

from moeforge.platform.config.builder import require


@dataclass
class OptimConfig:
    """V3 defaults: AdamW beta 0.9/0.95, weight decay 0.1, clip 1.0; warmup then cosine or
    constant-then-decay (V3 keeps the LR constant, then decays).

    The recipe schedules change two model values part-way through training, as V3 did: the bias
    update speed gamma (0.001, then 0 for the last 500B of 14.8T tokens) and the MTP loss weight
    lambda (0.3 for the first 10T tokens, then 0.1). Each is a list of `[from_tokens, value]` pairs:
    a step that starts with at least `from_tokens` tokens trained (step * data.global_batch *
    model.seq_len) uses `value`; before the first pair the model config's value holds
    (model.bias_update_speed, model.mtp_loss_weight). Empty: the model's value throughout.
    `platform.optim.recipe_schedule.recipe_at` reads them, for every training loop."""

    lr: float = 3e-3
    min_lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | constant_decay | constant
    decay_start_fraction: float = 0.8  # constant_decay: fraction of steps before the decay starts
    bias_update_speed_schedule: list[tuple[float, float]] = field(default_factory=list)
    mtp_loss_weight_schedule: list[tuple[float, float]] = field(default_factory=list)

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
        for name in ("bias_update_speed_schedule", "mtp_loss_weight_schedule"):
            setattr(self, name, _checked_changes(name, getattr(self, name)))


def _checked_changes(name: str, changes) -> list[tuple[float, float]]:
    """`changes` as a list of (from_tokens, value) tuples: token counts positive and strictly
    increasing (so each step has one value), values >= 0. Errors name the entry."""
    out: list[tuple[float, float]] = []
    for i, entry in enumerate(changes):
        where = f"{name}[{i}]"
        require(
            not isinstance(entry, (str, bytes)) and len(entry) == 2,
            where,
            f"must be a pair [from_tokens, value], got {entry!r}",
        )
        tokens, value = (float(x) for x in entry)
        require(tokens > 0, where, f"from_tokens must be positive, got {tokens:g}")
        if out:
            require(
                tokens > out[-1][0],
                where,
                f"from_tokens must exceed the previous entry's ({out[-1][0]:g}), got {tokens:g}",
            )
        require(value >= 0, where, f"value must be >= 0, got {value:g}")
        out.append((tokens, value))
    return out
