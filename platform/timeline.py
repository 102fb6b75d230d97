"""Timelines of pipeline execution: a PNG figure and a Chrome/Perfetto trace from plain records.

Input is a list of `TimelineRecord(rank, label, kind, start, end)`, whether simulated (see
`moeforge.platform.schedules.simulate`) or measured by the runtime. Conventions the plot understands:
`label` is an action string (`F0.3`, `B1.5`, `W0.2`, `BW1.4`, `F0.6&BW1.2`); it decides the colour
(chunk 0 / chunk 1 hues, F / B / W shades) and the number drawn in the box (the micro-batch). Labels
that are not action strings are drawn grey with the label as text. Times are in any unit (simulated
cost units or seconds); the Chrome trace writes them as microseconds after multiplying by `time_scale`.
"""

from __future__ import annotations

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
_DARK = {"W", "BW"}


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


def _colour(kind: str, chunk: int) -> str:
    return _PALETTE.get(chunk % 2, {}).get(kind, _OTHER)


def plot_timeline(
    records: list[TimelineRecord], path, title: str | None = None, time_unit: str = "time"
) -> None:
    """Write a PNG: one row per rank (rank 0 on top), one box per record, coloured by chunk and kind and
    labelled with its micro-batch; an overlapped F&B pair is one box with a black border, forward on the
    upper half and backward on the lower half."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    if not records:
        raise ValueError("plot_timeline: no records to plot")
    ranks = sorted({r.rank for r in records})
    row = {rank: i for i, rank in enumerate(ranks)}
    t0 = min(r.start for r in records)
    t1 = max(r.end for r in records)
    span = max(t1 - t0, 1e-12)
    shortest = min((r.end - r.start for r in records if r.end > r.start), default=span)
    # Wide enough that the shortest box can hold a two-digit number.
    width = min(max(10.0, 0.45 * span / shortest), 60.0)
    fig, ax = plt.subplots(figsize=(width, 0.55 * len(ranks) + 1.6))
    font = 7 if len(ranks) <= 8 else 6
    for rec in records:
        y = len(ranks) - 1 - row[rec.rank]
        x, w = rec.start - t0, rec.end - rec.start
        halves = _halves(rec.label)
        if halves is None:
            ax.add_patch(Rectangle((x, y + 0.05), w, 0.9, facecolor=_OTHER, edgecolor="white", linewidth=0.5))
            ax.text(x + w / 2, y + 0.5, rec.label, ha="center", va="center", fontsize=font)
            continue
        h = 0.9 / len(halves)
        for i, (kind, chunk, mb) in enumerate(halves):
            yy = y + 0.95 - (i + 1) * h
            colour = _colour(kind, chunk)
            ax.add_patch(Rectangle((x, yy), w, h, facecolor=colour, edgecolor="white", linewidth=0.5))
            ax.text(
                x + w / 2,
                yy + h / 2,
                mb,
                ha="center",
                va="center",
                fontsize=font,
                color="white" if kind in _DARK else "black",
            )
        if len(halves) == 2:
            ax.add_patch(Rectangle((x, y + 0.05), w, 0.9, fill=False, edgecolor="black", linewidth=1.2))
    ax.set_xlim(0, span)
    ax.set_ylim(-0.1, len(ranks) + 0.05)
    ax.set_yticks([len(ranks) - 1 - i + 0.5 for i in range(len(ranks))])
    ax.set_yticklabels([f"rank {r}" for r in ranks])
    ax.set_xlabel(time_unit)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    chunks = sorted({c for rec in records for _, c, _ in (_halves(rec.label) or [])})
    kinds = [
        k
        for k in ("F", "B", "BW", "W")
        if any(k == kk for rec in records for kk, _, _ in (_halves(rec.label) or []))
    ]
    handles = [Patch(facecolor=_colour(k, c), label=f"{k} chunk {c}") for c in chunks for k in kinds]
    if any(len(_halves(rec.label) or []) == 2 for rec in records):
        handles.append(Patch(facecolor="white", edgecolor="black", label="F&B overlapped (top F, bottom B)"))
    if handles:
        ax.legend(
            handles=handles,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.22 - 0.1 / len(ranks)),
            ncol=min(len(handles), 9),
            fontsize=8,
            frameon=False,
        )
    if title:
        ax.set_title(title, fontsize=10)
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
