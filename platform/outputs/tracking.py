"""Experiment tracking: W&B from global rank 0, and console progress lines.

`make_tracker(tracking_cfg, run_cfg_dict, rank)` returns a `Tracker`: a W&B run on global rank 0 when
`tracking.backend=wandb` (`wandb.init` directly, never Ray's setup_wandb, so exactly one process
owns the run), a no-op everywhere else. The run's config is the resolved training config with
secrets redacted. Mode: `tracking.mode`, else WANDB_MODE, else online when an API key is
configured and offline when none is. W&B files go under run.dir (a local staging folder uploaded to
run.dir at finish when run.dir is on S3).

`ConsoleProgress` prints one line every N steps (step, loss, lr, tokens/s, MFU when the peak FLOP/s is
known, ETA) with the shared formatter `platform.outputs.metrics.format_progress`, and the final summary.
"""

from __future__ import annotations

import netrc
import os
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

from moeforge.platform.config.cadence import Cadence
from moeforge.platform.config.tracking import TrackingConfig
from moeforge.platform.outputs.metrics import StepMetrics, TrainSummary, format_progress
from moeforge.platform.outputs.storage import is_s3, open_storage, redact


class Tracker(ABC):
    """Where metrics go besides the console and run.dir/metrics.jsonl."""

    @abstractmethod
    def log(self, step: int, metrics: Mapping[str, Any]) -> None: ...

    @abstractmethod
    def log_image(self, step: int, name: str, path: str) -> None: ...

    @abstractmethod
    def finish(self, summary: Mapping[str, Any] | None = None) -> None: ...


class NullTracker(Tracker):
    """tracking=none, and every rank but global rank 0."""

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        pass

    def log_image(self, step: int, name: str, path: str) -> None:
        pass

    def finish(self, summary: Mapping[str, Any] | None = None) -> None:
        pass


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(cfg: TrackingConfig) -> str:
    """online | offline | disabled: the config, else WANDB_MODE, else online only with an API key."""
    if cfg.mode:
        return cfg.mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    return "online" if _has_api_key() else "offline"


class WandbTracker(Tracker):
    """One W&B run; construct through make_tracker (which enforces rank 0)."""

    def __init__(self, cfg: TrackingConfig, run_config: Mapping[str, Any]) -> None:
        import wandb

        run = dict(run_config.get("run", {}) or {})
        self.run_dir = str(run.get("dir", "runs/default"))
        self._remote = is_s3(self.run_dir)
        local_dir = tempfile.mkdtemp(prefix="moeforge-wandb-") if self._remote else self.run_dir
        os.makedirs(local_dir, exist_ok=True)
        self.mode = resolve_mode(cfg)
        self.run = wandb.init(
            project=cfg.project,
            name=run.get("name"),
            config=redact(dict(run_config)),
            dir=local_dir,
            mode=self.mode,
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )
        self.local_dir = local_dir
        self.files_dir = getattr(self.run, "dir", None)  # <dir>/wandb/<run>/files

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.run.log(dict(metrics), step=step)

    def log_image(self, step: int, name: str, path: str) -> None:
        import wandb

        self.run.log({name: wandb.Image(path)}, step=step)

    def finish(self, summary: Mapping[str, Any] | None = None) -> None:
        if summary:
            self.run.summary.update({k: v for k, v in summary.items() if not isinstance(v, (list, dict))})
        self.run.finish()
        # finish() can return before W&B's service process has flushed the run file (seen offline
        # under load); shutting the service down waits for it. A later wandb.init starts a new one.
        import wandb

        wandb.teardown()
        if self._remote:  # W&B writes locally; keep its files with the run's other records
            storage = open_storage(self.run_dir)
            root = os.path.join(self.local_dir, "wandb")
            for folder, _, files in os.walk(root):
                for name in files:
                    path = os.path.join(folder, name)
                    if os.path.isfile(path) and not os.path.islink(path):
                        storage.upload(path, "wandb/" + os.path.relpath(path, root).replace(os.sep, "/"))


def make_tracker(tracking_cfg: TrackingConfig, run_cfg_dict: Mapping[str, Any], rank: int) -> Tracker:
    """The tracker for this process: W&B on global rank 0 when configured, otherwise a no-op."""
    if rank != 0 or tracking_cfg.backend == "none" or resolve_mode(tracking_cfg) == "disabled":
        return NullTracker()
    return WandbTracker(tracking_cfg, run_cfg_dict)


class ConsoleProgress:
    """One progress line every `every` steps (and at the last), throughput averaged over the steps
    since the previous line; MFU = achieved FLOP/s / peak FLOP/s when both FLOP figures are given
    (`flops_per_token`: training FLOPs per token, e.g. platform.plan.accounting; `peak_flops`: all devices).
    `start_step`: the step a resumed run starts from, so the ETA rate counts only this run's steps."""

    def __init__(
        self,
        total_steps: int,
        every: int,
        log: Callable[[str], None] = print,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        start_step: int = 0,
    ) -> None:
        self.total_steps, self.log = total_steps, log
        self.cadence = Cadence(total_steps, log_every=every)
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.start_step = start_step
        self.start = time.perf_counter()
        self._window_time, self._window_tokens = 0.0, 0

    def mfu(self, tokens_per_s: float) -> float | None:
        if not self.flops_per_token or not self.peak_flops:
            return None
        return tokens_per_s * self.flops_per_token / self.peak_flops

    def update(self, metrics: StepMetrics, suffix: str = "") -> str | None:
        """Account one step; return (and log) the progress line when one is due, with `suffix`
        (what only some loops measure, e.g. a pipeline's bubble) at its end."""
        self._window_time += metrics.step_time_s
        self._window_tokens += metrics.tokens
        if not self.cadence.logs(metrics.step):
            return None
        rate = self._window_tokens / max(self._window_time, 1e-9)
        done = max(metrics.step - self.start_step, 1)
        eta = (self.total_steps - metrics.step) * (time.perf_counter() - self.start) / done
        line = format_progress(metrics, self.total_steps, rate, eta, mfu=self.mfu(rate)) + suffix
        self._window_time, self._window_tokens = 0.0, 0
        self.log(line)
        return line

    def finish(self, summary: TrainSummary, suffix: str = "") -> str:
        line = summary.format()
        mfu = self.mfu(summary.tokens_per_s)
        if mfu is not None and summary.status == "completed":
            line += f" | mfu {100 * mfu:.1f}%"
        line += suffix
        self.log(line)
        return line
