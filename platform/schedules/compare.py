"""What `moeforge-schedule` does, as functions: the typed job config, the comparison of all schedules for
one setting, the text table and the output files (PNG timeline, Chrome trace, schedule text)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeforge.platform.config.builder import build_config
from moeforge.platform.outputs.timeline import plot_timeline, write_chrome_trace
from moeforge.platform.schedules import GENERATORS, build_schedule
from moeforge.platform.schedules.actions import Schedule, ScheduleError
from moeforge.platform.schedules.formulas import formula_bubble, formula_holds
from moeforge.platform.schedules.io import load_schedule, save_schedule
from moeforge.platform.schedules.phase_costs import PhaseCostsConfig
from moeforge.platform.schedules.simulate import Costs, SimResult, simulate
from moeforge.platform.schedules.validate import validate

FORMATS = ("text", "json")


@dataclass
class ScheduleJobConfig:
    """conf/schedule.yaml as a typed config. `file` (a custom schedule file) replaces schedule/pp/
    microbatches. Errors name the field."""

    schedule: str = "dualpipe"
    pp: int = 8
    microbatches: int = 20
    file: str | None = None
    cost: Costs = field(default_factory=Costs)
    print_actions: bool = False
    format: str = "text"
    out_dir: str = "runs/schedule"
    plot: bool = True
    # F&B pairs from phase costs: cost.f / cost.b / cost.fb derived, overlap on against off
    phases: PhaseCostsConfig | None = None

    def __post_init__(self) -> None:
        if self.file is None and self.schedule not in GENERATORS:
            raise ScheduleError(f"schedule: must be one of {', '.join(GENERATORS)}, got {self.schedule!r}")
        for name in ("pp", "microbatches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ScheduleError(f"{name}: must be an integer >= 1, got {value!r}")
        if self.format not in FORMATS:
            raise ScheduleError(f"format: must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not self.out_dir:
            raise ScheduleError("out_dir: must not be empty")

    @property
    def chunk_cost(self) -> Costs:
        """The per-chunk costs to simulate: `cost`, or with `phases` the overlapped pair's."""
        return self.cost if self.phases is None else self.phases.costs(self.cost, overlap=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ScheduleJobConfig:
        """Through the one config builder: unknown keys and wrong types fail naming the key."""
        return build_config(cls, values)


@dataclass
class Row:
    name: str
    result: SimResult | None
    formula: float | None
    formula_exact: bool
    error: str | None = None


def chosen_schedule(cfg: ScheduleJobConfig) -> Schedule:
    """The schedule the config asks for, generated (or loaded) and validated."""
    schedule = load_schedule(cfg.file) if cfg.file else build_schedule(cfg.schedule, cfg.pp, cfg.microbatches)
    validate(schedule)
    return schedule


def chunk_costs(schedule: Schedule, stage_costs: Costs) -> Costs:
    """The job's costs are for one stage of a pp-stage model; DualPipeV's chunks are half-stages (its
    model is cut into 2pp stages), so they cost half. Other layouts: unchanged."""
    return stage_costs.scaled(schedule.pp / schedule.num_stages)


def compare(pp: int, num_microbatches: int, costs: Costs) -> list[Row]:
    """Every built-in schedule for the same setting (same model on pp ranks, `costs` per stage of a
    pp-stage model): simulated where legal, else the reason."""
    rows = []
    for name in GENERATORS:
        try:
            schedule = build_schedule(name, pp, num_microbatches)
        except ScheduleError as err:
            rows.append(Row(name, None, None, False, str(err)))
            continue
        validate(schedule)
        chunk = chunk_costs(schedule, costs)
        rows.append(
            Row(
                name,
                simulate(schedule, chunk),
                formula_bubble(name, pp, chunk),
                formula_holds(name, pp, num_microbatches, chunk),
            )
        )
    return rows


def format_table(rows: list[Row], chosen: str) -> str:
    """Aligned text table; the chosen schedule is marked with '*'."""
    head = [
        "",
        "schedule",
        "makespan",
        "bubble max",
        "bubble min",
        "formula",
        "peak act",
        "act/stage",
        "params",
    ]
    lines = [head]
    for row in rows:
        mark = "*" if row.name == chosen else ""
        if row.result is None:
            lines.append([mark, row.name, f"not legal: {row.error}"])
            continue
        r = row.result
        formula = (
            "-" if row.formula is None else f"{row.formula:g}" + ("" if row.formula_exact else " (approx)")
        )
        lines.append(
            [
                mark,
                row.name,
                f"{r.makespan:g}",
                f"{max(r.idle):g}",
                f"{min(r.idle):g}",
                formula,
                str(max(r.peak_activations)),
                f"{max(r.peak_activation_units):g}",
                f"{r.param_memory:g}x",
            ]
        )
    widths = [
        max(len(line[i]) for line in lines if len(line) > i and len(line) == len(head))
        for i in range(len(head))
    ]
    out = []
    for line in lines:
        if len(line) != len(head):
            out.append(f"{line[0]:<{widths[0]}}  {line[1]:<{widths[1]}}  {line[2]}")
        else:
            out.append(
                "  ".join(
                    cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))
                )
            )
    notes = (
        "bubble = makespan - busy time of a rank (max/min over ranks); formula = DualPipe README table "
        "(approx: outside its exact conditions, see moeforge.platform.schedules.formulas); peak act = most "
        "(micro-batch, chunk) activations live on a rank; act/stage and params in units of one stage of a "
        "pp-stage model; costs are per stage of a pp-stage model (dualpipev chunks: half)"
    )
    return "\n".join(out + ["", notes])


def write_outputs(
    schedule: Schedule, result: SimResult, out_dir: str | Path, plot: bool = True
) -> dict[str, str]:
    """Write the timeline PNG, the Chrome trace and the schedule text file; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{schedule.name}_pp{schedule.pp}_mb{schedule.num_microbatches}"
    paths = {"schedule_file": str(save_schedule(schedule, out / f"{stem}.schedule.txt"))}
    records = result.records()
    trace = out / f"{stem}.trace.json"
    write_chrome_trace(records, trace, time_scale=1000.0)
    paths["trace"] = str(trace)
    if plot:
        png = out / f"{stem}.png"
        title = (
            f"{schedule.name}: pp={schedule.pp}, micro-batches={schedule.num_microbatches}, "
            f"makespan {result.makespan:g}, bubble max {max(result.idle):g}, "
            f"peak activations {max(result.peak_activations)}"
        )
        plot_timeline(records, png, title=title, time_unit="time (cost units)")
        paths["png"] = str(png)
    return paths
