"""The end of every benchmark job: the JSON report written, the table returned."""

from __future__ import annotations

import json

from moeforge.platform.outputs.storage import write_text_file


def write_report(output: str, report: dict, table: str) -> str:
    """Write `report` as JSON at `output` (a local path or s3://, atomically); return `table` and
    where the report went, for the job to print."""
    write_text_file(output, json.dumps(report, indent=1) + "\n")
    return f"{table}\nwrote {output}"
