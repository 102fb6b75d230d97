"""Timeline outputs (PNG, Chrome trace) and the moeforge-schedule job."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from moeforge.jobs.schedule import main
from moeforge.platform.outputs.timeline import TimelineRecord, plot_timeline, write_chrome_trace
from moeforge.platform.schedules import Costs, build_schedule, simulate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


def test_plot_and_trace_from_records(tmp_path):
    """Measured-style records (including a non-action label) plot and trace without simulator internals."""
    records = [
        TimelineRecord(0, "F0.0", "F", 0.0, 0.010),
        TimelineRecord(1, "F0.0", "F", 0.012, 0.020),
        TimelineRecord(1, "F0.6&BW1.2", "FB", 0.020, 0.045),
        TimelineRecord(0, "optimizer", "other", 0.050, 0.060),
    ]
    png, trace = tmp_path / "t.png", tmp_path / "t.json"
    plot_timeline(records, png, title="measured")
    write_chrome_trace(records, trace)  # seconds -> microseconds
    assert png.read_bytes()[:8] == PNG_MAGIC
    events = json.loads(trace.read_text())["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    assert [(e["tid"], e["name"]) for e in complete] == [(r.rank, r.label) for r in records]
    assert complete[2]["ts"] == pytest.approx(20_000) and complete[2]["dur"] == pytest.approx(25_000)
    names = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert names == {0: "rank 0", 1: "rank 1"}


def test_a_long_step_wraps_onto_panels_of_readable_width(tmp_path):
    """A step of many short actions is drawn as stacked panels of consecutive time windows, each
    16 in (1,760 px) wide, instead of one strip tens of thousands of pixels long; a short step is one
    panel, as wide as its boxes need."""
    from PIL import Image

    long_step = [
        TimelineRecord(rank, f"F0.{i}", "F", i + 0.5 * rank, i + 0.5 * rank + 0.9) for rank in (0, 1) for i in range(400)
    ]
    plot_timeline(long_step, tmp_path / "long.png", title="400 micro-batches")
    width, height = Image.open(tmp_path / "long.png").size
    panels = 8  # 0.45 x 400.5 / 0.9 = 200 in of boxes: more than 8 panels' worth, so 8 panels
    assert (width, height) == (16 * 110, round((panels * (0.55 * 2 + 0.9) + 0.9) * 110))
    short = [TimelineRecord(0, "F0.0", "F", 0.0, 1.0), TimelineRecord(1, "B0.0", "B", 1.0, 2.0)]
    plot_timeline(short, tmp_path / "short.png")
    assert Image.open(tmp_path / "short.png").size == (10 * 110, round((0.55 * 2 + 0.9 + 0.9) * 110))


def test_simulated_records_cover_every_compute_action():
    s = build_schedule("dualpipev", 2, 4)
    records = simulate(s, Costs()).records()
    assert len(records) == sum(1 for acts in s.actions for a in acts if a.kind.is_compute)
    assert all(r.end > r.start for r in records)


def test_job_text_output(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        ["schedule=dualpipe", "pp=4", "microbatches=8", "cost.fb=2.5", f"out_dir={out}", "print_actions=true"]
    )
    text = capsys.readouterr().out
    assert rc == 0
    assert text.startswith("rank 0: F0.0 SEND_F0.0>1")
    table = {line.lstrip("* ").split()[0]: line for line in text.splitlines() if line[3:].startswith(NAMES)}
    assert set(table) == set(NAMES) and table["dualpipe"].startswith("*")
    assert [line.startswith("*") for line in table.values()].count(True) == 1
    assert table["dualpipe"].split()[2:4] == ["24", "1.5"]  # makespan, max bubble = (4/2-1)(2.5+2-3)
    assert (out / "dualpipe_pp4_mb8.png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads((out / "dualpipe_pp4_mb8.trace.json").read_text())["traceEvents"]
    assert f"wrote {out / 'dualpipe_pp4_mb8.png'}" in text


def test_job_json_output(tmp_path, capsys):
    rc = main(["schedule=zb1p", "pp=4", "microbatches=8", "format=json", f"out_dir={tmp_path}", "plot=false"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert report["schedule"] == "zb1p" and report["bubble"] == [3.0] * 4  # (4-1)(1+2-2*1)
    assert report["peak_activations"] == [4, 3, 2, 1] and report["makespan"] == 27.0
    assert {row["schedule"] for row in report["compare"]} == {"1f1b", "zb1p", "dualpipe", "dualpipev"}
    assert not (tmp_path / "zb1p_pp4_mb8.png").exists()


def test_job_odd_pp_marks_dualpipe_illegal_in_the_comparison(tmp_path, capsys):
    assert main(["schedule=1f1b", "pp=3", "microbatches=6", f"out_dir={tmp_path}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    dualpipe = next(line for line in lines if line[3:].startswith("dualpipe "))
    assert (
        dualpipe.split(None, 1)[1].strip()
        == "not legal: pp: DualPipe needs an even number of pipeline ranks, got 3"
    )
    assert any(line.startswith("*  1f1b") for line in lines)


def test_job_runs_a_custom_file(tmp_path, capsys):
    path = tmp_path / "mine.txt"
    path.write_text(
        "layout: v\ntransfers: auto\nrank 0: F0.0 F1.0 BW1.0 BW0.0\nrank 1: F0.0 F1.0 BW1.0 BW0.0\n"
    )
    assert main([f"file={path}", f"out_dir={tmp_path}", "plot=false"]) == 0
    assert "* mine: makespan" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["schedule=dualpipe", "pp=7"], "pp: DualPipe needs an even number of pipeline ranks, got 7"),
        (["schedule=dualpipe", "pp=8", "microbatches=10"], "microbatches: DualPipe needs at least 2*pp = 16"),
        (["cost.w=5"], "cost.w:"),
        (["schedule=gpipe"], "schedule: must be one of"),
        (["format=yaml"], "format: must be one of"),
        (["file=/nonexistent/x.txt"], "schedule file /nonexistent/x.txt does not exist"),
    ],
)
def test_job_bad_values(args, message, tmp_path, capsys):
    assert main(args + [f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moeforge-schedule: error: ") and message in err


def test_console_script_exit_code_without_traceback(tmp_path):
    exe = Path(sys.executable).with_name("moeforge-schedule")
    proc = subprocess.run(
        [str(exe), "schedule=dualpipe", "pp=7", f"out_dir={tmp_path}"],
        capture_output=True,
        check=False,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "moeforge-schedule: error: pp: DualPipe needs an even number of pipeline ranks, got 7"
    )
    assert "Traceback" not in proc.stderr and proc.stdout == ""
