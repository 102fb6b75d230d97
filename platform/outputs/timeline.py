"""Timelines of pipeline execution: a PNG figure and a Chrome/Perfetto trace from plain records.

Input is a list of `TimelineRecord(rank, label, kind, start, end)`, whether simulated (see
`moeforge.platform.schedules.simulate`) or measured by the runtime. Conventions the plot understands:
`label` is an action string (`F0.3`, `B1.5`, `W0.2`, `BW1.4`, `F0.6&BW1.2`); it decides the colour
(chunk 0 / chunk 1 hues, F / B / W shades) and the number drawn in the box (the micro-batch). Labels
that are not action strings are drawn grey with the label as text. Times are in any unit (simulated
cost units or seconds); the Chrome trace writes them as microseconds after multiplying by `time_scale`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TimelineRecord:
    rank: int
    label: str
    kind: str
    start: float
    end: float


# Hue per chunk (direction), shade per kind: light forward, medium input-gradient backward, dark
# weight gradient; a full backward (BW) sits between B and W.
_PALETTE = {
    0: {"F": "#c6dbef", "B": "#6baed6", "BW": "#2171b5", "W": "#08306b"},  # chunk 0: blues
    1: {"F": "#fdd0a2", "B": "#fdae6b", "BW": "#e6550d", "W": "#7f2704"},  # chunk 1: oranges
}
_OTHER = "#bdbdbd"
_WAIT = "#de2d26"
_A2A = {"F": "#9e9ac8", "B": "#74c476"}  # all-to-alls in flight: a forward's purple, a backward's green
_DARK = {"W", "BW"}
_PHASES = {"PHASE_F", "PHASE_B"}


def _a2a_direction(rec: TimelineRecord) -> str | None:
    """ "F" / "B" for an all-to-all span or wait (a backward's labels say "grad" or start with B)."""
    if rec.kind not in ("A2A", "A2A_WAIT"):
        return None
    label = rec.label.removeprefix("wait ")
    return "B" if label.startswith("B") or label.endswith("grad") else "F"


def _halves(label: str) -> list[tuple[str, int, str]] | None:
    """[(kind, chunk, micro-batch text)] for an action label (two entries for an F&B pair), else None."""
    from moeforge.platform.schedules.actions import Kind, ScheduleError, parse_action

    try:
        action = parse_action(label)
    except ScheduleError:
        return None
    if action.kind is Kind.FB:
        return [("F", action.chunk, str(action.mb)), (action.b_kind.value, action.b_chunk, str(action.b_mb))]
    if action.kind.is_comm:
        return None
    return [(action.kind.value, action.chunk, str(action.mb))]


PANEL_WIDTH_IN = 16.0  # one panel's width (1,760 px at the PNG's 110 dpi)
MAX_PANELS = 8  # a longer step squeezes its boxes rather than grow taller than this


def _colour(kind: str, chunk: int) -> str:
    return _PALETTE.get(chunk % 2, {}).get(kind, _OTHER)


def plot_timeline(
    records: list[TimelineRecord], path, title: str | None = None, time_unit: str = "time"
) -> None:
    """Write a PNG: one row per rank (rank 0 on top), one box per compute record, coloured by chunk and
    kind and labelled with its micro-batch; an overlapped F&B pair is one box with a black border, forward
    on the upper half and backward on the lower half. Records whose label is not a compute action
    (measured sends, receives, waits, ...) are drawn as a thin strip along the bottom of their rank's row,
    coloured by `kind` (WAIT in red). Phase records (PHASE_F / PHASE_B, an overlapped pair's
    compute phases) are outlined inside their pair's box, forward half or backward half; MoE
    all-to-all spans (A2A) get two lanes of the strip of their own, forward and backward, so the
    transfers of both micro-batches of a pair show while the other computes."""
    from matplotlib.patches import Patch, Rectangle
    from moeforge.platform.outputs.pyplot import plt

    if not records:
        raise ValueError("plot_timeline: no records to plot")
    phases = [rec for rec in records if rec.kind in _PHASES]
    parsed = [(rec, _halves(rec.label)) for rec in records if rec.kind not in _PHASES]
    compute = [(rec, halves) for rec, halves in parsed if halves is not None]
    others = [rec for rec, halves in parsed if halves is None]
    ranks = sorted({r.rank for r in records})
    row = {rank: len(ranks) - 1 - i for i, rank in enumerate(ranks)}  # rank 0 on top
    t0 = min(r.start for r in records)
    span = max(max(r.end for r in records) - t0, 1e-12)
    durations = [r.end - r.start for r, _ in compute if r.end > r.start] or [span]
    # Wide enough that the shortest compute box can hold a two-digit number; a step longer than one
    # readable width wraps onto stacked panels, each a consecutive window of time (left to right,
    # then the next panel), so the picture stays about as wide as a screen.
    width = max(10.0, 0.45 * span / min(durations))
    panels = min(max(1, math.ceil(width / PANEL_WIDTH_IN)), MAX_PANELS)
    width = min(width, PANEL_WIDTH_IN) if panels > 1 else width
    panel_h = 0.55 * len(ranks) + 0.9
    fig, axes = plt.subplots(panels, 1, figsize=(width, panels * panel_h + 0.9), squeeze=False)
    axes = [a[0] for a in axes]
    font = 7 if len(ranks) <= 8 else 6
    has_a2a = any(_a2a_direction(rec) for rec in others)
    strip = (0.27 if has_a2a else 0.15) if others else 0.0  # bottom strip for non-compute records
    top, bottom = 0.95, 0.05 + strip
    pair_half = (top - bottom) / 2
    other_kinds = sorted({rec.kind for rec in others if not _a2a_direction(rec)})
    lane = strip / 3 if has_a2a else strip  # p2p at the bottom, then forward and backward all-to-alls
    window = span / panels
    for p, ax in enumerate(axes):
        lo, hi = p * window, (p + 1) * window
        for rec, halves in compute:
            y, x, w = row[rec.rank], rec.start - t0, rec.end - rec.start
            if x > hi or x + w < lo:
                continue
            h = (top - bottom) / len(halves)
            for i, (kind, chunk, mb) in enumerate(halves):
                yy = y + top - (i + 1) * h
                ax.add_patch(
                    Rectangle((x, yy), w, h, facecolor=_colour(kind, chunk), edgecolor="white", linewidth=0.5)
                )
                colour = "white" if kind in _DARK else "black"
                if lo <= x + w / 2 <= hi:  # a label belongs to the panel that holds its box's middle
                    ax.text(x + w / 2, yy + h / 2, mb, ha="center", va="center", fontsize=font, color=colour)
            if len(halves) == 2:
                ax.add_patch(
                    Rectangle((x, y + bottom), w, top - bottom, fill=False, edgecolor="black", linewidth=1.2)
                )
        for rec in phases:  # outlines inside the pair box: forward phases above, backward below
            y = row[rec.rank] + (top - pair_half if rec.kind == "PHASE_F" else bottom)
            ax.add_patch(
                Rectangle(
                    (rec.start - t0, y),
                    rec.end - rec.start,
                    pair_half,
                    fill=False,
                    edgecolor="black",
                    linewidth=0.4,
                )
            )
        for rec in others:
            direction = _a2a_direction(rec)
            if rec.kind.upper() in ("WAIT", "A2A_WAIT"):
                colour = _WAIT
            else:
                colour = _A2A[direction] if direction else _OTHER
            level = {None: 0, "F": 1, "B": 2}[direction]
            ax.add_patch(
                Rectangle(
                    (rec.start - t0, row[rec.rank] + 0.04 + level * lane), rec.end - rec.start, lane, color=colour
                )
            )
        ax.set_xlim(lo, hi)
        ax.set_ylim(-0.1, len(ranks) + 0.05)
        ax.set_yticks([row[r] + 0.5 for r in ranks])
        ax.set_yticklabels([f"rank {r}" for r in ranks])
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    axes[-1].set_xlabel(time_unit)
    ax = axes[-1]
    present = {(kind, chunk) for _, halves in compute for kind, chunk, _ in halves}
    handles = [
        Patch(facecolor=_colour(k, c), label=f"{k} chunk {c}")
        for c in sorted({c for _, c in present})
        for k in ("F", "B", "BW", "W")
        if (k, c) in present
    ]
    if any(len(halves) == 2 for _, halves in compute):
        handles.append(Patch(facecolor="white", edgecolor="black", label="F&B overlapped (top F, bottom B)"))
    if has_a2a:
        handles += [Patch(facecolor=_A2A[d], label=f"all-to-all in flight ({d})") for d in ("F", "B")]
    if other_kinds:
        handles.append(
            Patch(facecolor=_OTHER, label="/".join(k for k in other_kinds if k.upper() != "WAIT") or "other")
        )
    if any(rec.kind.upper() in ("WAIT", "A2A_WAIT") for rec in others):
        handles.append(Patch(facecolor=_WAIT, label="WAIT"))
    if handles:
        ax.legend(
            handles=handles,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.35 - 0.1 / len(ranks)),
            ncol=min(len(handles), 9),
            fontsize=8,
            frameon=False,
        )
    if title:
        axes[0].set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_chrome_trace(records: list[TimelineRecord], path, time_scale: float = 1e6) -> None:
    """Write a Chrome / Perfetto trace (JSON object format, complete 'X' events): one thread per rank.
    `time_scale` converts record times to microseconds (1e6 for seconds; the schedule job uses 1000 so
    one simulated cost unit shows as one millisecond)."""
    import json

    events = []
    for rank in sorted({r.rank for r in records}):
        events.append(
            {"name": "thread_name", "ph": "M", "pid": 0, "tid": rank, "args": {"name": f"rank {rank}"}}
        )
        events.append(
            {"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": rank, "args": {"sort_index": rank}}
        )
    for rec in records:
        events.append(
            {
                "name": rec.label,
                "cat": rec.kind,
                "ph": "X",
                "pid": 0,
                "tid": rec.rank,
                "ts": rec.start * time_scale,
                "dur": (rec.end - rec.start) * time_scale,
            }
        )
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, fh)
