"""Dropping one recurring third-party log message at the logger that emits it, leaving the logger's
other records alone: Ray's, DeepSpeed's and matplotlib's lines that every run would otherwise print
(used by the Ray connection's worker hook, the training worker and the shared pyplot)."""

from __future__ import annotations

import logging
import os


class _DropMessage(logging.Filter):
    """Drops a logger's records whose message starts with `prefix` (and, given `source`, whose file
    path contains it); the rest pass."""

    def __init__(self, prefix: str, source: str | None = None) -> None:
        super().__init__()
        self.prefix, self.source = prefix, source

    def filter(self, record: logging.LogRecord) -> bool:
        if self.source is not None and self.source not in record.pathname.replace(os.sep, "/"):
            return True
        return not record.getMessage().startswith(self.prefix)


def drop_log_message(logger_name: str, prefix: str, source: str | None = None) -> None:
    """Drop the records of logger `logger_name` ("" is the root logger) whose message starts with
    `prefix` and, given `source`, that come from a file whose path contains `source` (e.g.
    "deepspeed/comm/"). Once per process and message; the logger's other records pass as before.

    A logger's filter sees the records logged on that logger itself, before any handler."""
    logger = logging.getLogger(logger_name)
    if not any(
        isinstance(f, _DropMessage) and (f.prefix, f.source) == (prefix, source) for f in logger.filters
    ):
        logger.addFilter(_DropMessage(prefix, source))
