"""Run a snippet or module under Triton's CPU interpreter and read the JSON it prints.

TRITON_INTERPRET must be set before triton is first imported, so every interpreted check runs in a
fresh interpreter (one intra-op thread, as on the suite's other workers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


def run_interpreted(args: list[str], what: str, ok_codes: tuple[int, ...] = (0,), timeout: float = 300) -> Any:
    """`python args...` with TRITON_INTERPRET=1; its stdout parsed as JSON. An exit status outside
    `ok_codes` fails the calling test with the end of its stderr, naming `what`."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    assert proc.returncode in ok_codes, f"{what} crashed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)
