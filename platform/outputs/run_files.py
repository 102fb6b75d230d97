"""The one place a run writes its records: resolved config, metrics lines, final summary.

`run.dir` is a local directory or an `s3://bucket/prefix` (through platform.outputs.storage, which checks an
S3 root up front and fails with one message). Object stores cannot append, so metrics lines go to a
local file and, for a remote run.dir, that file is uploaded whole on every `flush()`.

A resumed run keeps the metrics of the steps its checkpoint covers and appends after them
(`start_metrics(after_step)`); lines of steps past the checkpoint (recorded by the interrupted run,
then lost with its unsaved state) are dropped, because the resumed run records those steps again.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import yaml
from moeforge.platform.outputs.loss_plot import loss_curve_png
from moeforge.platform.outputs.storage import LocalStorage, open_storage, redact

CONFIG, METRICS, SUMMARY, LOSS_PNG = "config.yaml", "metrics.jsonl", "summary.json", "loss.png"
# A file named STOP in run.dir asks a run to stop after its step in progress, with a checkpoint,
# as SIGTERM does; whoever can write run.dir can ask (the Ray driver on Ctrl-C, a user, a scheduler).
STOP = "STOP"


class RunOutputs:
    """config.yaml (secrets redacted), metrics.jsonl (one JSON object per step) and summary.json
    under `run_dir`.

    `fresh=True` (the default) starts an empty metrics file now. `fresh=False` leaves an existing
    one alone until the caller knows where the run starts and calls `start_metrics(after_step)`
    (a resuming loop: the step comes from the checkpoint it finds through `self.storage`)."""

    def __init__(self, run_dir: str, fresh: bool = True) -> None:
        self.storage = open_storage(run_dir)
        self.name = run_dir.rstrip("/").rsplit("/", 1)[-1]  # titles the loss curve
        self.remote = not isinstance(self.storage, LocalStorage)
        local_dir = tempfile.mkdtemp(prefix="moeforge-run-") if self.remote else run_dir
        os.makedirs(local_dir, exist_ok=True)
        self.metrics_path = os.path.join(local_dir, METRICS)
        self._unflushed = False
        if fresh:
            self.start_metrics(0)

    def start_metrics(self, after_step: int) -> list[dict]:
        """Keep the recorded metrics of steps 1..after_step (0: none), drop the rest, and return
        the kept records. Later `append_metrics` calls add after them."""
        kept = [] if after_step <= 0 else [r for r in self._existing_records() if int(r["step"]) <= after_step]
        with open(self.metrics_path, "w") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        self._unflushed = True
        self.flush()
        return kept

    def _existing_records(self) -> list[dict]:
        """The metrics lines already under run_dir (downloaded for a remote run_dir); a torn last
        line (a crash mid-write) is ignored."""
        if self.remote:
            if not self.storage.exists(METRICS):
                return []
            text = self.storage.read_text(METRICS)
        elif os.path.isfile(self.metrics_path):
            with open(self.metrics_path) as f:
                text = f.read()
        else:
            return []
        records = []
        for line in text.splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # only the last line can be torn; nothing valid follows it
        return records

    def write_config(self, config: Mapping[str, Any]) -> None:
        """config.yaml: the run's whole config in plain YAML, secrets redacted (PyYAML, which the
        GPU image has too; Hydra's omegaconf reads it back)."""
        text = yaml.safe_dump(_plain(redact(dict(config))), sort_keys=False, default_flow_style=False)
        self.storage.write_text(CONFIG, text)

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(dict(record), sort_keys=True) + "\n")
        self._unflushed = True

    def flush(self) -> None:
        """Make the metrics written so far visible under run_dir (an upload for a remote run.dir)."""
        if self.remote and self._unflushed:
            self.storage.upload(self.metrics_path, METRICS)
        self._unflushed = False

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """summary.json, and beside it loss.png drawn from the metrics recorded so far (named in the
        summary as `loss_curve`); a run that recorded no step gets no picture."""
        self.flush()
        summary = dict(summary)
        records = self._existing_records()
        if records:
            title = f"{self.name}: {len(records)} steps"
            self.storage.write_bytes(LOSS_PNG, loss_curve_png({"run": records}, title=title))
            summary["loss_curve"] = self.storage.url(LOSS_PNG)
        self.storage.write_text(SUMMARY, json.dumps(summary, indent=2, sort_keys=True) + "\n")


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, so the YAML reads back as plain lists."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
