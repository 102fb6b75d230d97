"""Where a run's weights start: random, a Hugging Face checkpoint, or another run's checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

from moeforge.platform.config.builder import require

INIT_KINDS = ("hf", "run")


@dataclass
class InitConfig:
    """`init.from` (the field is `from_`: `from` is a Python keyword):

        ""                   random weights (model.initializer_range, run.seed)
        hf:<dir>             a Hugging Face DeepSeek-V3 directory, BF16 or the published FP8 layout;
                             the model config comes from its config.json
        run:<dir>[@<step>]   another moeforge run's checkpoint (the newest complete one, or that
                             step), weights and router biases only; the model config from its meta

    Either way the run is a new one: step 0, a fresh optimizer, its own run.dir. A run that resumes
    its own checkpoints (checkpoint.resume) continues from them instead."""

    from_: str = ""

    def __post_init__(self) -> None:
        if not self.from_:
            return
        kind, sep, rest = self.from_.partition(":")
        require(
            bool(sep) and kind in INIT_KINDS and bool(rest),
            "from",
            f"must be hf:<dir> or run:<dir>[@<step>] (or empty for random weights), got {self.from_!r}",
        )
        if kind == "run" and "@" in rest:
            step = rest.rpartition("@")[2]
            require(step.isdigit(), "from", f"run:<dir>@<step> needs a step number, got {self.from_!r}")

    @property
    def kind(self) -> str | None:
        """"hf", "run", or None for random weights."""
        return self.from_.partition(":")[0] if self.from_ else None

    @property
    def path(self) -> str:
        rest = self.from_.partition(":")[2]
        if self.kind == "run" and "@" in rest:
            return rest.rpartition("@")[0]
        return rest

    @property
    def step(self) -> int | None:
        """run:<dir>@<step>'s step; None for the newest."""
        rest = self.from_.partition(":")[2]
        return int(rest.rpartition("@")[2]) if self.kind == "run" and "@" in rest else None
