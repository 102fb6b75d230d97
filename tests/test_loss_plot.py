"""Every run summary comes with a loss-curve picture drawn from its own metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from moeforge.platform.outputs.loss_plot import loss_curve_png
from moeforge.platform.outputs.run_files import RunOutputs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_summary_writes_loss_png_from_recorded_metrics(tmp_path):
    outputs = RunOutputs(str(tmp_path / "run"))
    for step in range(1, 6):
        record = {"step": step, "loss": 5.0 / step, "lm_loss": 4.0 / step}
        if step % 2 == 0:
            record["eval_loss"] = 4.5 / step
        outputs.append_metrics(record)
    outputs.write_summary({"name": "unit", "final_loss": 1.0})
    png = (tmp_path / "run" / "loss.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["loss_curve"].endswith("loss.png") and summary["final_loss"] == 1.0


def test_no_steps_no_picture(tmp_path):
    outputs = RunOutputs(str(tmp_path / "run"))
    outputs.write_summary({"status": "failed"})
    assert not (tmp_path / "run" / "loss.png").exists()
    assert "loss_curve" not in json.loads((tmp_path / "run" / "summary.json").read_text())


def test_records_without_loss_are_refused():
    with pytest.raises(ValueError, match="no metric record carries a loss"):
        loss_curve_png({"a": [{"step": 1, "lr": 0.1}]})


def test_legend_names_the_objective_and_the_eval_lm_loss():
    import matplotlib.pyplot as plt
    from moeforge.platform.outputs.loss_plot import loss_curve_figure

    records = [{"step": 1, "loss": 5.0, "lm_loss": 4.0, "mtp_loss": 6.0, "eval_loss": 4.2, "eval_ppl": 66.7}]
    fig = loss_curve_figure({"run": records})
    labels = fig.axes[0].get_legend_handles_labels()[1]
    plt.close(fig)
    assert labels == ["train objective (LM + λ·MTP)", "train LM loss", "train MTP loss", "eval LM loss"]


def test_building_the_font_cache_logs_nothing(tmp_path):
    """A fresh interpreter with an empty matplotlib cache and INFO logging (as Ray workers have):
    matplotlib builds its font cache and would log "generated new fontManager"; the shared pyplot
    drops that line, and the cache was really built (else the test would show nothing)."""
    script = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from moeforge.platform.outputs import loss_plot\n"
        "loss_plot.loss_curve_figure({'run': [{'step': 1, 'loss': 2.0}, {'step': 2, 'loss': 1.5}]})\n"
    )
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(tmp_path.glob("fontlist-*.json")), "matplotlib built no font cache"
    assert "fontManager" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
