"""Per-step metrics, the end-of-run summary, and their console formatting.

Shared by the reference loop and the pipeline runtime's rank 0 so both print and record the same
fields under the same names.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


@dataclass
class StepMetrics:
    """What one optimizer step did. Losses are means over the step's tokens (all micro-batches)."""

    step: int  # 1-based count of optimizer steps taken so far
    loss: float  # lm_loss + mtp_loss_weight * mtp_loss (what was back-propagated, before aux)
    lm_loss: float
    mtp_loss: float
    aux_loss: float  # sequence-wise balance loss as the MoE layers record it, mean over layers
    lr: float
    bias_update_speed: float  # gamma of this step's router-bias update (optim.bias_update_speed_schedule)
    mtp_loss_weight: float  # lambda in `loss` (optim.mtp_loss_weight_schedule)
    grad_norm: float  # global norm before clipping
    tokens: int  # tokens in this step (global batch * seq_len)
    step_time_s: float
    load_imbalance: float  # worst MoE layer's max/mean expert load in this step (model.balance)
    max_expert_load: float = 0.0  # that layer's tokens on its busiest expert ...
    mean_expert_load: float = 0.0  # ... and per expert on average
    skipped: bool = False  # a non-finite loss or grad norm: no update was applied (`optim.bad_steps`)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_time_s if self.step_time_s > 0 else 0.0

    @property
    def base(self) -> StepMetrics:
        """The figures every step engine reports (a pipeline step's metrics wrap them in `base`)."""
        return self

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["tokens_per_s"] = self.tokens_per_s
        return out


@dataclass
class TrainSummary:
    """End of a run: enough to tell whether it learned and how fast, and how it ended.

    `losses` covers the whole run, resumed segments included (`steps` counts them all);
    `tokens_per_s` and `elapsed_s` cover this process's segment only."""

    steps: int
    first_loss: float | None  # the training objective (LM + MTP); None when no step completed
    final_loss: float | None
    tokens_per_s: float  # over this process's steps
    elapsed_s: float
    eval_loss: float | None = None  # held-out LM cross-entropy, the last evaluation's
    eval_ppl: float | None = None  # exp(eval_loss)
    first_lm_loss: float | None = None  # the training LM cross-entropy, comparable with eval_loss
    final_lm_loss: float | None = None
    losses: list[float] = field(default_factory=list)  # per step, for tests and plots
    status: str = "completed"  # completed | failed | interrupted (Ctrl-C, SIGTERM)
    error: str | None = None  # "ExceptionType: message" when failed
    resumed_from_step: int | None = None  # the checkpoint step this segment started from
    checkpoint: str | None = None  # the newest complete checkpoint this run wrote
    skipped_steps: int = 0  # steps whose update was skipped (non-finite loss or grad norm)
    rollbacks: list[dict] = field(default_factory=list)  # loss-spike rollbacks (`optim.bad_steps.Rollback`)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def format(self) -> str:
        if self.status != "completed":
            return f"{self.status} after {self.steps} steps ({format_duration(self.elapsed_s)}): {self.error}"
        line = f"done: {self.steps} steps in {format_duration(self.elapsed_s)}"
        # LM beside LM: the training objective adds the weighted MTP loss, which evaluation's
        # loss does not, so the line shows the training LM loss next to the eval LM loss.
        first = self.first_lm_loss if self.first_lm_loss is not None else self.first_loss
        final = self.final_lm_loss if self.final_lm_loss is not None else self.final_loss
        if first is not None and final is not None:
            line += f" | LM loss {first:.4f} -> {final:.4f}"
        line += f" | {self.tokens_per_s:,.0f} tok/s"
        if self.eval_loss is not None:
            line += f" | eval LM loss {self.eval_loss:.4f}"
            if self.eval_ppl is not None:
                line += f" (ppl {self.eval_ppl:,.1f})"
        return line


@dataclass
class EvalResult:
    """A held-out evaluation, the same fields from both training loops.

    `lm_loss` is the next-token cross-entropy (nats per token), the figure people compare runs by,
    recorded as `eval_loss` with its perplexity `eval_ppl`. `objective` is what training minimises
    (LM + mtp_loss_weight * MTP; the balance loss only shapes routing in training), recorded as
    `eval_objective`. Means over equal-sized micro-batches, so over every held-out token."""

    lm_loss: float
    objective: float

    @property
    def ppl(self) -> float:
        return math.exp(min(self.lm_loss, 700.0))  # exp overflows a float past ~709 nats

    def to_record(self) -> dict[str, float]:
        return {"eval_loss": self.lm_loss, "eval_ppl": self.ppl, "eval_objective": self.objective}

    def format(self, step: int) -> str:
        return (
            f"eval at step {step}: loss {self.lm_loss:.4f} | ppl {self.ppl:,.1f} | "
            f"objective {self.objective:.4f}"
        )


def format_duration(seconds: float) -> str:
    """`1h02m`, `3m07s`, `12s`."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_progress(
    m: StepMetrics, total_steps: int, tokens_per_s: float, eta_s: float, mfu: float | None = None
) -> str:
    """The one console progress line: step/total, loss, lr, throughput, expert load imbalance (the
    busiest expert's tokens over the mean, in the worst MoE layer: 1.00 is perfect balance), ETA,
    and MFU when known (a fraction of peak FLOP/s).

    `tokens_per_s` and `eta_s` are passed in (averaged by the caller over recent steps) because a
    single step's time is noisy; platform.outputs.tracking.ConsoleProgress does that averaging."""
    width = len(str(total_steps))
    line = (
        f"step {m.step:>{width}}/{total_steps} | loss {m.loss:.4f} | lr {m.lr:.2e} | "
        f"gnorm {m.grad_norm:.3f} | {tokens_per_s:,.0f} tok/s | "
        f"expert load max/mean {m.load_imbalance:.2f} (worst layer) | "
        f"eta {format_duration(eta_s)}"
    )
    if mfu is not None:
        line += f" | mfu {100 * mfu:.1f}%"
    return line
