"""moeforge-schedule: generate, validate and simulate a pipeline schedule, compare it with the others.

    moeforge-schedule schedule=dualpipe pp=8 microbatches=20 cost.f=1 cost.b=2 cost.w=1 cost.fb=2.5
    moeforge-schedule schedule=1f1b pp=4 microbatches=8 print_actions=true
    moeforge-schedule schedule=zb1p pp=4 microbatches=8 format=json
    moeforge-schedule file=my_schedule.txt

Prints the comparison table of all schedules legal for the setting (the chosen one marked '*'), writes
a PNG timeline, a Chrome/Perfetto trace and the schedule's text form to out_dir (default
runs/schedule). Configs come from the `moeforge.conf` package (conf/schedule.yaml), composed with
Hydra's compose API (the same source as config_path="pkg://moeforge.conf", config_name="schedule") so
that a bad value ends in one line on stderr and exit status 2, with no traceback and no Hydra output
directory. The work lives in moeforge.platform.schedules.compare.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from moeforge.platform.cli import compose_values, run_cli
from moeforge.platform.outputs.storage import check_local_output
from moeforge.platform.schedules import ScheduleError, simulate
from moeforge.platform.schedules.compare import (
    ScheduleJobConfig,
    chosen_schedule,
    chunk_costs,
    compare,
    format_table,
    write_outputs,
)

CONFIG_NAME = "schedule"
PROG = "moeforge-schedule"


def run(argv: Sequence[str]) -> str:
    """Compose the config from Hydra overrides, do the work and return what to print."""
    cfg = ScheduleJobConfig.from_dict(compose_values(CONFIG_NAME, argv)[0])
    check_local_output(cfg.out_dir, "out_dir", directory=True)
    schedule = chosen_schedule(cfg)
    result = simulate(schedule, chunk_costs(schedule, cfg.chunk_cost))
    rows = compare(schedule.pp, schedule.num_microbatches, cfg.chunk_cost)
    paths = write_outputs(schedule, result, cfg.out_dir, plot=cfg.plot)
    overlap = None
    if cfg.phases is not None:  # what parallel.overlap would gain on this schedule
        pair = cfg.phases.pair()
        without = simulate(schedule, chunk_costs(schedule, cfg.phases.costs(cfg.cost, overlap=False)))
        overlap = {
            "pair_overlapped": pair.overlapped,
            "pair_sequential": pair.sequential,
            "hidden_fraction": pair.hidden_fraction,
            "makespan_overlapped": result.makespan,
            "makespan_sequential": without.makespan,
        }
    if cfg.format == "json":
        report = result.to_dict()
        report["costs"] = vars(cfg.chunk_cost)
        if overlap is not None:
            report["overlap"] = overlap
        report["compare"] = [
            {"schedule": row.name, "error": row.error}
            if row.result is None
            else {**row.result.to_dict(), "formula_bubble": row.formula, "formula_exact": row.formula_exact}
            for row in rows
        ]
        report["files"] = paths
        return json.dumps(report)
    parts = []
    if cfg.print_actions:
        parts += [str(schedule), ""]
    parts.append(format_table(rows, schedule.name))
    if all(row.name != schedule.name for row in rows):  # a custom schedule file
        parts.append(
            f"* {schedule.name}: makespan {result.makespan:g}, bubble max {max(result.idle):g}, "
            f"peak activations {max(result.peak_activations)}"
        )
    parts += ["", f"bubble per rank ({schedule.name}): " + " ".join(f"{x:g}" for x in result.idle)]
    if overlap is not None:
        parts.append(
            f"overlap (from phases): F&B pair {overlap['pair_sequential']:g} -> {overlap['pair_overlapped']:g}, "
            f"{overlap['hidden_fraction']:.0%} of its transfers hidden; {schedule.name} makespan "
            f"{overlap['makespan_sequential']:g} -> {overlap['makespan_overlapped']:g}"
        )
    parts += [f"wrote {path}" for path in paths.values()]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, __doc__, argv, run, errors=(ScheduleError,))


if __name__ == "__main__":
    sys.exit(main())
