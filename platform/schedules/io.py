"""A plain-text file format for custom schedules, and its reader and writer.

Format (UTF-8 text; `#` starts a comment; blank lines are ignored):

    # a 2-rank 1F1B written by hand
    name: my-1f1b            # optional, default: the file name without extension
    layout: linear           # linear | bidirectional | v   (optional, default linear)
    microbatches: 2          # optional, default: 1 + the largest micro-batch index used
    peak: 2 1                # optional claimed peak live activations per rank, default: what the
                             #   lists reach (then the validator's memory check is only a recount)
    param_copies: 1          # optional, default 2 for bidirectional, else 1
    transfers: explicit      # explicit (default): SEND/RECV are written in the lists;
                             #   auto: the lists hold compute only and SEND/RECV pairs are placed
                             #   automatically (deadlock-free, see builder.add_transfers)
    rank 0: F0.0 SEND_F0.0>1 F0.1 SEND_F0.1>1 RECV_B0.0<1 BW0.0 RECV_B0.1<1 BW0.1
    rank 1: RECV_F0.0<0 F0.0 RECV_F0.1<0 BW0.0 SEND_B0.0>0 F0.1 BW0.1 SEND_B0.1>0

One `rank R:` line per rank, ranks 0..pp-1 each exactly once (pp is the number of rank lines); the
actions are the string forms of `Action` separated by spaces. Header keys come before the rank lines.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from moeforge.platform.schedules.actions import LAYOUTS, Schedule, ScheduleError, parse_action
from moeforge.platform.schedules.builder import add_transfers
from moeforge.platform.schedules.validate import peak_live_activations, validate

_KEYS = ("name", "layout", "microbatches", "peak", "param_copies", "transfers")


def parse_schedule(text: str, source: str = "<schedule>", check: bool = True) -> Schedule:
    """Build a Schedule from the file format above; `check` also runs `validate`. Errors name
    `source:line`."""
    header: dict[str, str] = {}
    ranks: dict[int, list] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{lineno}"
        key, sep, value = line.partition(":")
        if not sep:
            raise ScheduleError(f"{where}: expected 'key: value' or 'rank N: actions', got {line!r}")
        key, value = key.strip(), value.strip()
        if key.startswith("rank"):
            number = key[len("rank") :].strip()
            if not number.isdigit():
                raise ScheduleError(f"{where}: bad rank line {key!r} (expected 'rank N:')")
            rank = int(number)
            if rank in ranks:
                raise ScheduleError(f"{where}: rank {rank} listed twice")
            try:
                ranks[rank] = [parse_action(tok) for tok in value.split()]
            except ScheduleError as err:
                raise ScheduleError(f"{where}: {err}") from None
        elif key in _KEYS:
            if ranks:
                raise ScheduleError(f"{where}: header key {key!r} must come before the rank lines")
            header[key] = value
        else:
            raise ScheduleError(f"{where}: unknown key {key!r} (known: {', '.join(_KEYS)}, rank N)")
    if not ranks:
        raise ScheduleError(f"{source}: no 'rank N:' lines")
    pp = len(ranks)
    if sorted(ranks) != list(range(pp)):
        raise ScheduleError(f"{source}: ranks must be 0..{pp - 1}, got {sorted(ranks)}")
    actions = [ranks[r] for r in range(pp)]

    layout = header.get("layout", "linear")
    if layout not in LAYOUTS:
        raise ScheduleError(f"{source}: layout must be one of {LAYOUTS}, got {layout!r}")
    mbs = [a.mb for acts in actions for a in acts] + [
        a.b_mb for acts in actions for a in acts if a.b_mb is not None
    ]
    num_mb = _int(header, "microbatches", source, default=max(mbs, default=-1) + 1)
    transfers = header.get("transfers", "explicit")
    if transfers not in ("explicit", "auto"):
        raise ScheduleError(f"{source}: transfers must be explicit or auto, got {transfers!r}")
    two_chunks = layout != "linear"
    schedule = Schedule(
        name=header.get("name", Path(source).stem),
        pp=pp,
        num_microbatches=num_mb,
        chunks_per_rank=2 if two_chunks else 1,
        num_stages=2 * pp if layout == "v" else pp,
        actions=actions,
        claimed_peak_activations=[0] * pp,
        param_copies=_int(header, "param_copies", source, default=2 if layout == "bidirectional" else 1),
        layout=layout,
    )
    if transfers == "auto":
        if any(a.kind.is_comm for acts in actions for a in acts):
            raise ScheduleError(f"{source}: transfers: auto, but the lists already contain SEND/RECV")
        schedule = add_transfers(schedule)
    if "peak" in header:
        try:
            peak = [int(v) for v in header["peak"].split()]
        except ValueError:
            raise ScheduleError(f"{source}: peak must be integers, got {header['peak']!r}") from None
        if len(peak) != pp:
            raise ScheduleError(f"{source}: peak needs one value per rank ({pp}), got {len(peak)}")
    else:
        peak = peak_live_activations(schedule)
    schedule = replace(schedule, claimed_peak_activations=peak)
    if check:
        try:
            validate(schedule)
        except ScheduleError as err:
            raise ScheduleError(f"{source}: {err}") from None
    return schedule


def _int(header: dict[str, str], key: str, source: str, default: int) -> int:
    if key not in header:
        return default
    try:
        return int(header[key])
    except ValueError:
        raise ScheduleError(f"{source}: {key} must be an integer, got {header[key]!r}") from None


def load_schedule(path: str | Path, check: bool = True) -> Schedule:
    """Read and (by default) validate a schedule file."""
    path = Path(path)
    if not path.is_file():
        raise ScheduleError(f"schedule file {path} does not exist")
    return parse_schedule(path.read_text(encoding="utf-8"), source=str(path), check=check)


def format_schedule(schedule: Schedule) -> str:
    """The file form of a schedule; `parse_schedule(format_schedule(s))` gives back the same lists."""
    lines = [
        f"name: {schedule.name}",
        f"layout: {schedule.layout}",
        f"microbatches: {schedule.num_microbatches}",
        "peak: " + " ".join(map(str, schedule.claimed_peak_activations)),
        f"param_copies: {schedule.param_copies}",
    ]
    lines += [f"rank {r}: " + " ".join(map(str, acts)) for r, acts in enumerate(schedule.actions)]
    return "\n".join(lines) + "\n"


def save_schedule(schedule: Schedule, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_schedule(schedule), encoding="utf-8")
    return path
