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
