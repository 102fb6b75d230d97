"""Loss curves as a PNG: what people look at first after a run.

Takes plain metric records (the lines of metrics.jsonl), so the training loops, the pipeline runtime
and the convergence benchmark all draw with the same code.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

from moeforge.platform.outputs.pyplot import plt

# metric key -> legend label; drawn when present in the records. `loss` is the training objective
# (LM + mtp_loss_weight * MTP); `eval_loss` is held-out LM cross-entropy, comparable with `lm_loss`.
CURVES = {
    "loss": "train objective (LM + λ·MTP)",
    "lm_loss": "train LM loss",
    "mtp_loss": "train MTP loss",
    "eval_loss": "eval LM loss",
}


def loss_curve_figure(runs: Mapping[str, Sequence[Mapping[str, Any]]], title: str = ""):
    """The matplotlib Figure of loss against step for one or more runs ({run name: metric records}).

    Each record needs `step`; every key of CURVES it carries becomes a line (eval loss as markers,
    since it is reported every few steps). Raises ValueError when no record has a loss."""
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    drawn = 0
    for run_name, records in runs.items():
        prefix = f"{run_name}: " if len(runs) > 1 else ""
        for key, label in CURVES.items():
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if not points:
                continue
            steps, values = zip(*points)
            style = {"marker": "o", "linestyle": "--"} if key == "eval_loss" else {}
            ax.plot(steps, values, label=prefix + label, linewidth=1.4, **style)
            drawn += 1
    if not drawn:
        plt.close(fig)
        raise ValueError("no metric record carries a loss to plot")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def loss_curve_png(runs: Mapping[str, Sequence[Mapping[str, Any]]], title: str = "") -> bytes:
    """PNG bytes of `loss_curve_figure(runs, title)`."""
    fig = loss_curve_figure(runs, title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
