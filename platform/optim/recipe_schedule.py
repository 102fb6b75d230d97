"""The recipe schedules: the bias update speed and the MTP loss weight of each optimizer step.

DeepSeek-V3 changed two values part-way through pre-training (technical report, section 4.2): the
bias update speed gamma of auxiliary-loss-free balancing was 0.001 for the first 14.3T tokens and 0
for the last 500B, and the MTP loss weight lambda was 0.3 for the first 10T tokens and 0.1 after.
`optim.bias_update_speed_schedule` and `optim.mtp_loss_weight_schedule`
(`platform.config.optim.OptimConfig`) give those changes as `[from_tokens, value]` pairs; before the
first pair the model config's value holds.

Like `lr_at`, `recipe_at` is a pure function of (step, config): the reference loop and every rank
of a pipeline run call it with the same arguments and agree without shared state, and a resumed run
needs nothing from the checkpoint to continue the schedule. The model never sees a step: the loops
pass lambda to `Transformer.head_and_loss` / `forward` and gamma to `bias_update.update_router_biases`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moeforge.platform.config.train import TrainConfig


@dataclass(frozen=True)
class RecipeValues:
    """The scheduled values one optimizer step trains with (both recorded in its StepMetrics)."""

    bias_update_speed: float  # gamma of the router-bias update after the step
    mtp_loss_weight: float  # lambda of loss = lm_loss + lambda * mtp_loss


def tokens_before(step: int, cfg: TrainConfig) -> int:
    """Tokens trained before optimizer step `step` (0-based): step * global batch * seq_len."""
    return step * cfg.data.global_batch * cfg.model.seq_len


def piecewise_value(initial: float, changes: Sequence[tuple[float, float]], tokens: float) -> float:
    """`initial`, or the value of the last `(from_tokens, value)` change with from_tokens <= tokens
    (`changes` sorted by from_tokens, as OptimConfig checks)."""
    value = initial
    for from_tokens, changed in changes:
        if tokens < from_tokens:
            break
        value = changed
    return value


def recipe_at(step: int, cfg: TrainConfig) -> RecipeValues:
    """The values of optimizer step `step` (0-based), from the tokens trained before it.

    A step that starts below a boundary keeps the earlier value for all of its tokens, so the change
    takes effect on the first step that starts at or past `from_tokens`."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    tokens = tokens_before(step, cfg)
    optim, model = cfg.optim, cfg.model
    return RecipeValues(
        bias_update_speed=piecewise_value(model.bias_update_speed, optim.bias_update_speed_schedule, tokens),
        mtp_loss_weight=piecewise_value(model.mtp_loss_weight, optim.mtp_loss_weight_schedule, tokens),
    )


def recipe_after(steps_taken: int, cfg: TrainConfig) -> RecipeValues:
    """The values of the last step of `steps_taken` (the first step's before any step): what an
    evaluation after those steps weights its objective by, so that its `eval_objective` and the
    step's `loss` in the same metrics record use one lambda."""
    return recipe_at(max(steps_taken - 1, 0), cfg)
